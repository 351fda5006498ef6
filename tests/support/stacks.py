"""The local stack (modelplex_kit.devstack) for end-to-end tests: a catalog written from model entries, and
the stack started over it with the catalog and the edge on free loopback ports, so modules run side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from modelplex_kit.devstack import Stack
from tests.support.ports import free_port


def write_catalog(directory: Path, models: list[dict[str, Any]]) -> Path:
    path = directory / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


def start_stack(catalog: Path, log_dir: Path, **options: Any) -> Stack:
    """``Stack(...).start()`` on free ports; ``options`` are Stack's own (env, keys_file, gatekeeper, ...)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return Stack(
        catalog, catalog_listen=f"127.0.0.1:{free_port()}", edge_port=free_port(), log_dir=log_dir, **options
    ).start()
