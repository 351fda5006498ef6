#!/bin/sh
# The real Triton Inference Server of the Triton suite (tests/triton/) and `make triton`, in one place.
#
#   scripts/triton-env.sh id               print this environment's identity: triton-<hash of pins + script>
#   scripts/triton-env.sh build PYTHON DIR make sure DIR holds tritonserver, its Python backend and numpy 1
#
# tritonserver 2.51 comes from the nvidia-pytriton wheel (pinned below), which ships the server, its
# Python backend and the backend's stubs for Python 3.8-3.13; nothing else of pytriton is used. On this
# CPU it starts in seconds (its CUDA, NVML and DCGM warnings are harmless).
#
# DIR/server/bin/tritonserver   the server; run it with LD_LIBRARY_PATH=DIR/server/lib
# DIR/server/backends/python    the Python backend, with the stub of Debian's Python 3.11 beside it
#                               (it links libpython3.11.so.1.0: apt-get installs libpython3.11)
# DIR/numpy1                    numpy 1.26.4 (pip --target). This backend build predates numpy 2: with
#                               numpy 2 a BYTES input crashes the stub and an FP32 tensor arrives
#                               corrupted. Each model's execution environment (tests/support/
#                               triton_server.py) puts it ahead of the packages the model imports.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
PYTRITON=nvidia-pytriton==0.7.0
NUMPY=numpy==1.26.4
STUB_PYTHON=3.11

case "${1:-}" in
id)
    printf 'triton-%s\n' "$(printf '%s %s\n' "$PYTRITON" "$NUMPY" | cat - "$here/triton-env.sh" | sha256sum | cut -c1-12)"
    ;;
build)
    python=$2 dir=$3
    if [ ! -e /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 ] || ! command -v unzip >/dev/null \
        || ! /usr/bin/python3.11 -c 'import venv' 2>/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "triton: installing libpython3.11, python3.11-venv and unzip (apt-get)" >&2
            # flock: make runs this beside scripts/vllm-env.sh, and two apt-gets at once fail on dpkg's lock.
            flock /tmp/modelplex-apt.lock sh -c 'DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpython3.11 python3.11-venv unzip >/dev/null' || true
        fi
    fi
    if [ -f "$dir/.ready" ]; then
        echo "triton: using $dir" >&2
        exit 0
    fi
    echo "triton: unpacking tritonserver from $PYTRITON into $dir (once per pin set)" >&2
    rm -rf "$dir"
    # A pip of its own (ensurepip, offline): make runs this while .venv is still being built, and a
    # system Python may have no pip.
    if /usr/bin/python3.11 -c 'import ensurepip, venv' 2>/dev/null; then
        python=/usr/bin/python3.11
    fi
    "$python" -m venv "$dir/pip"
    python=$dir/pip/bin/python
    mkdir -p "$dir/download"
    "$python" -m pip download -q --no-deps --only-binary :all: -d "$dir/download" "$PYTRITON"
    unzip -q "$dir"/download/nvidia_pytriton-*.whl 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' -d "$dir/unpacked"
    mv "$dir/unpacked/pytriton/tritonserver" "$dir/server"
    mv "$dir/unpacked/nvidia_pytriton.libs" "$dir/server/lib"
    cp "$dir/server/python_backend_stubs/$STUB_PYTHON/triton_python_backend_stub" "$dir/server/backends/python/"
    chmod +x "$dir/server/bin/tritonserver" "$dir/server/backends/python/triton_python_backend_stub"
    rm -rf "$dir/unpacked" "$dir/download" "$dir/server/python_backend_stubs"
    "$python" -m pip install -q --no-deps --only-binary :all: --python-version "$STUB_PYTHON" \
        --target "$dir/numpy1" "$NUMPY"
    rm -rf "$dir/pip"
    chmod -R a+rX,go-w "$dir"
    touch "$dir/.ready"
    ;;
*)
    echo "usage: $0 id | build PYTHON DIR" >&2
    exit 2
    ;;
esac
