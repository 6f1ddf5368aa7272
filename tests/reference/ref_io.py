"""The reference side of bridge.py: read the inputs and args a parity test wrote, write the outputs back.

Runs in .venv-ref only. A reference script does

    inputs, args, work = ref_io.read()
    ...
    ref_io.write(work, {"logits": logits})
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def read() -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(inputs, args, work directory) from the directory named on the command line."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} WORK_DIR (run it through tests/reference/bridge.py)")
    work = Path(sys.argv[1])
    return load_file(str(work / "inputs.safetensors")), json.loads((work / "args.json").read_text()), work


def write(work: Path, outputs: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in outputs.items()}, str(work / "outputs.safetensors"))


def check_hf_peft() -> None:
    """Fail loudly if ``import peft`` would give this project's package instead of Hugging Face's."""
    import peft

    if not hasattr(peft, "__version__") or "site-packages" not in str(Path(peft.__file__)):
        raise ImportError(f"`import peft` found {peft.__file__}, not Hugging Face's peft in .venv-ref")


def load_gpt2(model_dir, attn_implementation: str = "sdpa"):
    """transformers' GPT2LMHeadModel from a folder the test wrote, float32, eval mode; refuses a folder whose weights
    do not all load or whose head is not tied to the token embedding (GPT-2's own layout)."""
    from transformers import GPT2LMHeadModel

    model, info = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True,
                                                  attn_implementation=attn_implementation)
    missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]  # the head is tied to wte
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(f"GPT-2 weights did not load cleanly: {info}")
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise ValueError("lm_head is not tied to wte")
    return model.eval()
