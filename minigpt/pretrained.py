"""Load GPT-2 weights saved in the Hugging Face layout from a local directory (no network, no transformers).

The directory holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``). The names differ from ours:

    transformer.wte / wpe                  -> input_layer.wte / wpe
    transformer.h.{i}.ln_1 / ln_2          -> encoder.blocks.{i}.ln_1 / ln_2
    transformer.h.{i}.attn.c_attn (C, 3C)  -> attn.query / key / value, each (C, C)
    transformer.h.{i}.attn.c_proj          -> attn.proj
    transformer.h.{i}.mlp.c_fc / c_proj    -> mlp.fc / mlp.proj
    transformer.ln_f                       -> output_layer.ln_f
    lm_head.weight (often absent: tied)    -> output_layer.head (tied to wte)

GPT-2's ``Conv1D`` stores its weight as (in, out), the transpose of ``nn.Linear``'s (out, in).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import GPTConfig
from .model import GPT

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json activation_function {activation!r}: only GPT-2's tanh GELU is supported")
    values = dict(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=0.0,
    )
    return GPTConfig(**{**values, **overrides})


def convert_hf_state_dict(hf_sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename and reshape a Hugging Face GPT-2 state dict into this library's names."""
    sd = {(k[len("transformer.") :] if k.startswith("transformer.") else k): v for k, v in hf_sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    C = config.n_embd
    out = {}

    def take(name, shape):
        if name not in sd:
            raise KeyError(f"GPT-2 weights are missing tensor {name!r}")
        t = sd.pop(name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} for this config")
        return t

    out["input_layer.wte.weight"] = take("wte.weight", (config.vocab_size, C))
    out["input_layer.wpe.weight"] = take("wpe.weight", (config.block_size, C))
    for i in range(config.n_layer):
        h, b = f"h.{i}.", f"encoder.blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[b + ln + ".weight"] = take(h + ln + ".weight", (C,))
            out[b + ln + ".bias"] = take(h + ln + ".bias", (C,))
        w = take(h + "attn.c_attn.weight", (C, 3 * C)).t()  # Conv1D (in, out) -> Linear (out, in): (3C, C)
        bias = take(h + "attn.c_attn.bias", (3 * C,))
        for j, name in enumerate(("query", "key", "value")):
            out[b + f"attn.{name}.weight"] = w[j * C : (j + 1) * C]
            out[b + f"attn.{name}.bias"] = bias[j * C : (j + 1) * C]
        out[b + "attn.proj.weight"] = take(h + "attn.c_proj.weight", (C, C)).t()
        out[b + "attn.proj.bias"] = take(h + "attn.c_proj.bias", (C,))
        out[b + "mlp.fc.weight"] = take(h + "mlp.c_fc.weight", (C, 4 * C)).t()
        out[b + "mlp.fc.bias"] = take(h + "mlp.c_fc.bias", (4 * C,))
        out[b + "mlp.proj.weight"] = take(h + "mlp.c_proj.weight", (4 * C, C)).t()
        out[b + "mlp.proj.bias"] = take(h + "mlp.c_proj.bias", (C,))
    out["output_layer.ln_f.weight"] = take("ln_f.weight", (C,))
    out["output_layer.ln_f.bias"] = take("ln_f.bias", (C,))
    head = sd.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, out["input_layer.wte.weight"]):
        raise ValueError("lm_head.weight differs from wte.weight; this GPT ties the head to the token embedding")
    if sd:
        raise ValueError(f"unexpected tensors in the GPT-2 weights: {sorted(sd)[:10]}")
    out["output_layer.head.weight"] = out["input_layer.wte.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def load_gpt2(path, **overrides) -> GPT:
    """A GPT with the weights of the Hugging Face-format GPT-2 directory at path. overrides: GPTConfig fields
    such as dropout."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a GPT-2 directory: config.json is missing")
    config = config_from_hf(json.loads((directory / "config.json").read_text()), **overrides)
    sd = convert_hf_state_dict(read_state_dict(directory), config)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(sd, assign=True)
    model.output_layer.head.weight = model.input_layer.wte.weight  # assign=True replaced the tied parameter
    return model
