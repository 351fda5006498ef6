"""The modality registry: found from the package's modules, one row per catalog Modality value."""

from __future__ import annotations

from pathlib import Path

from modelplex.v1 import catalog_pb2
from modelplex_kit import modalities
from modelplex_kit.modalities import REGISTRY, by_proto


def test_every_module_of_the_package_is_a_row() -> None:
    modules = {p.stem for p in Path(modalities.__file__).parent.glob("*.py")} - {"__init__", "base"}
    assert set(REGISTRY) == modules


def test_one_row_per_catalog_modality_in_enum_order() -> None:
    values = [v for v in catalog_pb2.Modality.values() if v != catalog_pb2.MODALITY_UNSPECIFIED]
    assert [row.proto for row in REGISTRY.values()] == sorted(values)
    assert all(by_proto(v) is not None for v in values)


def test_rows_follow_the_conventions_the_deployment_files_rely_on() -> None:
    """The chart derives package and envPrefix from the name; ports are 50060 + the enum value."""
    for name, row in REGISTRY.items():
        assert row.package == f"modelplex_{name}"
        assert row.env_prefix == f"MODELPLEX_{name.upper()}_"
        assert row.port == 50060 + row.proto
