#!/bin/sh
# The llama.cpp build of Modelplex, in one place: the Makefile and the text image both use it.
#
#   scripts/llama-wheel.sh id                 print this build's identity: llama-<hash of version + flags>
#   scripts/llama-wheel.sh build PYTHON DIR   make sure DIR holds the wheel for PYTHON, compiling it if not
#
# llama.cpp defaults to GGML_NATIVE=ON (-march=native): a library for the build machine's CPU only, which
# on a CPU with AMX compiles in AMX matrix kernels that fault wherever the OS has not enabled AMX (many VMs).
# Built here instead: the x86-64 instruction sets of every server of the last decade (AVX2, FMA, F16C,
# BMI2), no AVX-512, no AMX, no runtime-dispatched variants. The wheel lands in a directory named after the
# version and these flags, never in pip's cache, so a native wheel built elsewhere on the machine is never
# reused and a change of flags builds anew. tests/portability/test_portable_llama.py checks the result.
# LLAVA_BUILD=OFF: no multimodal library (libmtmd: clip, audio encoders, image decoding); the llama.cpp
# engine serves text, llama_cpp imports it only for multimodal chat handlers, and it was a good part of
# the compile on make test's critical path.
set -eu

CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF \
-DLLAVA_BUILD=OFF"

here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's/^llama[-_]cpp[-_]python==//Ip' "$here/../constraints.txt")
[ -n "$version" ] || { echo "llama-wheel.sh: no llama-cpp-python pin in constraints.txt" >&2; exit 1; }

case "${1:-}" in
id)
    printf 'llama-%s\n' "$(printf '%s %s' "$version" "$CMAKE_ARGS" | sha256sum | cut -c1-12)"
    ;;
build)
    python=$2 dir=$3
    for wheel in "$dir"/llama_cpp_python-"$version"-*.whl; do  # py3-none-<platform>: any CPython 3
        if [ -f "$wheel" ]; then
            echo "llama.cpp: using $wheel" >&2
            exit 0
        fi
    done
    echo "llama.cpp $version: compiling a portable build into $dir (minutes; once per flag set)" >&2
    # --no-binary: from source, whatever wheels PIP_FIND_LINKS offers; --no-cache-dir: never from pip's cache.
    CMAKE_ARGS="$CMAKE_ARGS" "$python" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
        -w "$dir" "llama-cpp-python==$version"
    ;;
*)
    echo "usage: $0 id | build PYTHON DIR" >&2
    exit 2
    ;;
esac
