"""The llama.cpp in the venv is the portable build: it runs on any x86-64 server of the last decade.

A native build (GGML_NATIVE=ON, -march=native) on a CPU with AMX compiles in AMX matrix kernels; where
the OS has not enabled the AMX tile state (many VMs) the first `ldtilecfg` is a general protection fault.
A native build on an AVX-512 machine (this one, for instance) carries AVX-512 code that other CPUs lack.
So the libraries are disassembled and searched for both, and what the build recorded is checked too.
The detector itself is shown to fail on small libraries compiled with AMX and AVX-512 intrinsics.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import pytest

OBJDUMP = shutil.which("objdump")
CC = shutil.which("gcc") or shutil.which("cc")

# AMX: tile configuration, loads, stores and the tile dot products (int8, bf16, fp16).
_AMX = re.compile(r"\s(ldtilecfg|sttilecfg|tileloaddt?1?|tilestored|tilerelease|tilezero|tdpb\w+|tdpfp16ps)\s")
# AVX-512: zmm registers, the EVEX-only xmm/ymm16-31, and the opmask registers k0-k7.
_AVX512 = re.compile(r"%(zmm\d+|[xy]mm(1[6-9]|2\d|3[01])|k[0-7])\b")


def forbidden_instructions(library: Path, limit: int = 5) -> dict[str, list[str]]:
    """Up to `limit` disassembled lines per kind (amx, avx512) found in `library`."""
    listing = subprocess.run(
        [OBJDUMP, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    found: dict[str, list[str]] = {"amx": [], "avx512": []}
    for line in listing.splitlines():
        for kind, pattern in (("amx", _AMX), ("avx512", _AVX512)):
            if len(found[kind]) < limit and pattern.search(line + " "):
                found[kind].append(line.strip())
    return found


def llama_libraries() -> list[Path]:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    libraries = sorted({p.resolve() for p in lib.glob("*.so*") if p.is_file()})
    assert any(p.name.startswith("libggml-cpu") for p in libraries), f"no libggml-cpu in {lib}"
    return libraries


@pytest.mark.skipif(OBJDUMP is None, reason="objdump (binutils) is not installed")
def test_llama_cpp_libraries_hold_no_amx_and_no_avx512():
    offenders = {}
    for library in llama_libraries():
        found = {kind: lines for kind, lines in forbidden_instructions(library).items() if lines}
        if found:
            offenders[library.name] = found
    assert not offenders, f"llama.cpp was not built portably (see scripts/llama-wheel.sh): {offenders}"


def test_llama_cpp_records_a_portable_build():
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    enabled = {key.strip() for key, value in re.findall(r"([A-Z0-9_ ]+)=\s*(\d)", info) if value == "1"}
    assert "AVX2" in enabled and "FMA" in enabled, info  # the flags of scripts/llama-wheel.sh took effect
    assert not {flag for flag in enabled if flag.startswith(("AVX512", "AMX"))}, info


def test_llama_cpp_build_settings_are_portable():
    # The wheel ships ggml's CMake package config, which records the options it was built with.
    files = importlib.metadata.files("llama-cpp-python") or []
    config = next((f for f in files if str(f).endswith("ggml/ggml-config.cmake")), None)
    assert config is not None, "llama-cpp-python ships no ggml-config.cmake"
    recorded = dict(re.findall(r'set\((GGML_\w+) "([^"]*)"\)', Path(config.locate()).read_text()))
    assert recorded["GGML_NATIVE"] == "OFF"  # no -march=native
    assert recorded["GGML_CPU_ALL_VARIANTS"] == "OFF"  # no runtime-dispatched variants
    assert recorded["GGML_AVX2"] == "ON" and recorded["GGML_FMA"] == "ON"
    on = {name for name, value in recorded.items() if value == "ON" and name.startswith(("GGML_AVX512", "GGML_AMX"))}
    assert not on


# -- the detector can fail --------------------------------------------------------------------
_AMX_SOURCE = """
#include <immintrin.h>
void tile_dot(const void *config, void *a, void *b, void *c) {
    _tile_loadconfig(config);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_zero(0);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, c, 64);
    _tile_release();
}
"""
_AVX512_SOURCE = """
#include <immintrin.h>
void add(float *a, const float *b) {
    _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b)));
}
"""
_AVX2_SOURCE = """
#include <immintrin.h>
void add(float *a, const float *b, const float *c) {
    _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b), _mm256_loadu_ps(c)));
}
"""


def _compile(tmp_path: Path, name: str, source: str, flags: list[str]) -> Path:
    (tmp_path / f"{name}.c").write_text(source)
    library = tmp_path / f"lib{name}.so"
    subprocess.run([CC, "-O2", "-shared", "-fPIC", *flags, "-o", str(library), str(tmp_path / f"{name}.c")], check=True)
    return library


@pytest.mark.skipif(OBJDUMP is None or CC is None, reason="needs objdump and a C compiler")
@pytest.mark.parametrize(
    ("source", "flags", "expected"),
    [
        (_AMX_SOURCE, ["-mamx-tile", "-mamx-int8"], {"amx"}),
        (_AVX512_SOURCE, ["-mavx512f"], {"avx512"}),
        (_AVX2_SOURCE, ["-mavx2", "-mfma"], set()),  # what the portable build may hold
    ],
    ids=["amx", "avx512", "avx2-passes"],
)
def test_the_detector_flags_amx_and_avx512(tmp_path, source, flags, expected):
    library = _compile(tmp_path, "probe", source, flags)
    found = forbidden_instructions(library, limit=50)
    assert {kind for kind, lines in found.items() if lines} == expected, found
    if "amx" in expected:  # every AMX instruction the kernel used is seen, not just one
        listing = " ".join(found["amx"])
        assert all(m in listing for m in ("ldtilecfg", "tileloadd", "tilezero", "tdpbssd", "tilestored"))
