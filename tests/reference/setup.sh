#!/usr/bin/env bash
# Create (or reuse) .venv-ref: the reference packages that `make parity` and `make bench` compare against.
#
# transformers, Hugging Face's peft and trl (its DPO and GRPO losses: tests/test_parity_rl.py) live here, never in
# .venv: Hugging Face's package is imported as `peft`, the same name as this project's package, so the reference side
# always runs in this venv, in its own process (see tests/reference/bridge.py). minigpt's own needs (torch, numpy,
# safetensors, tiktoken, regex) are installed too, so that benchmarks can import minigpt next to transformers in one
# process.
#
# Idempotent: the venv is reused while its stamp file is newer than this script. Any failure (no python3 venv,
# the registry unreachable, a pin that does not resolve) exits non-zero, and no stamp is written.
set -euo pipefail
trap 'echo "reference env: FAILED at line $LINENO of $0; .venv-ref is left without its stamp" >&2' ERR
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
VENV=.venv-ref
STAMP="$VENV/.installed"
SCRIPT=tests/reference/setup.sh

# Exact pins. torch is pinned to the project's own version (a looser pin would pull a newer, CUDA-sized build).
PINS=(
    torch==2.13.0
    transformers==5.24.0
    peft==0.21.2
    trl==1.16.0
    accelerate==1.15.0
    huggingface_hub==2.4.0
    tokenizers==0.23.3
    safetensors==0.8.0
    numpy==2.4.6
    tiktoken==0.14.0
    regex==2026.11.19
)

if [[ -f "$STAMP" && "$STAMP" -nt "$SCRIPT" && -x "$VENV/bin/python" ]]; then
    echo "reference env: reusing $VENV (delete it or touch $SCRIPT to rebuild)"
    exit 0
fi

echo "reference env: creating $VENV with ${PINS[*]}"
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
# fail here, not in the tests, if an import is broken (-P: the repo root, with this project's peft, stays off sys.path)
"$VENV/bin/python" -P -c "import torch, transformers, peft, trl, safetensors, tiktoken, regex; \
print('reference env: torch', torch.__version__, '| transformers', transformers.__version__, \
'| peft', peft.__version__, '| trl', trl.__version__)"
touch "$STAMP"
