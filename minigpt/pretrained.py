"""The Hugging Face GPT-2 folder layout, read and written here (no network, no transformers).

A folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), and for the tokenizer
``vocab.json`` (+ ``merges.txt``) or ``tokenizer.json``. The tensor names differ from ours:

    transformer.wte / wpe                  <-> input_layer.wte / wpe
    transformer.h.{i}.ln_1 / ln_2          <-> encoder.blocks.{i}.ln_1 / ln_2
    transformer.h.{i}.attn.c_attn (C, 3C)  <-> attn.query / key / value, each (C, C)
    transformer.h.{i}.attn.c_proj          <-> attn.proj
    transformer.h.{i}.mlp.c_fc / c_proj    <-> mlp.fc / mlp.proj
    transformer.ln_f                       <-> output_layer.ln_f
    lm_head.weight (often absent: tied)    <-> output_layer.head (tied to wte)

GPT-2's ``Conv1D`` stores its weight as (in, out), the transpose of ``nn.Linear``'s (out, in).

``read_gpt2`` gives (GPTConfig, state dict) for ``GPT.from_pretrained``; ``save_gpt2`` writes a minigpt GPT of GPT-2's
shape (pre-LN, biases) as such a folder, which transformers' ``GPT2LMHeadModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import GPTConfig
from .files import atomic_write, write_json

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old checkpoints
# config.json settings that change GPT-2's computation in ways this model does not implement: (key, GPT-2's value)
_UNSUPPORTED = (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                ("reorder_and_upcast_attn", False), ("add_cross_attention", False))
# config.json's activation_function -> GPTConfig.activation (transformers' names for GPT-2's tanh GELU and exact GELU)
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def is_gpt2_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} holds neither model.safetensors nor pytorch_model.bin")


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """Our GPTConfig for a GPT-2 config.json; settings this model does not compute are refused, by name."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json is for model_type {hf['model_type']!r}; only GPT-2 folders are read")
    activation = HF_ACTIVATIONS.get(hf.get("activation_function", "gelu_new"))
    if activation is None:
        raise ValueError(f"config.json activation_function {hf['activation_function']!r}: only GELU is supported "
                         f"(one of {sorted(HF_ACTIVATIONS)})")
    for key, gpt2_value in _UNSUPPORTED:
        if hf.get(key, gpt2_value) != gpt2_value:
            raise ValueError(f"config.json sets {key}={hf[key]!r}; this GPT computes GPT-2's attention "
                             f"({key}={gpt2_value!r}) and would give other outputs, so the folder is refused")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        raise ValueError(f"config.json sets n_inner={n_inner}; this GPT's MLP is 4 * n_embd = {4 * hf['n_embd']} wide")
    values = dict(
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=activation,
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


def read_gpt2(path, **overrides) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, state dict in this library's names) of the GPT-2 folder at path. overrides: GPTConfig fields."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a GPT-2 directory: config.json is missing")
    config = config_from_hf(json.loads((directory / "config.json").read_text()), **overrides)
    return config, convert_hf_state_dict(read_state_dict(directory), config)


# -- writing --------------------------------------------------------------------------------------------------


def hf_config(config: GPTConfig, eos_token_id: int | None = None) -> dict:
    """GPT-2's config.json for a minigpt GPTConfig of GPT-2's shape (pre-LN, with biases)."""
    if config.layout != "pre_ln" or not config.bias:
        raise ValueError(f"only a GPT-2-shaped model (layout 'pre_ln', bias=True) has a GPT-2 folder layout; this "
                         f"one has layout {config.layout!r}, bias={config.bias}")
    eos = config.vocab_size - 1 if eos_token_id is None else eos_token_id
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "activation_function": "gelu_new" if config.activation == "gelu_tanh" else "gelu",
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "layer_norm_epsilon": config.layer_norm_eps, "initializer_range": 0.02, "scale_attn_weights": True,
            "use_cache": True, "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True}


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of convert_hf_state_dict: this library's names to GPT-2's (the tied lm_head left out)."""
    out = {"transformer.wte.weight": sd["input_layer.wte.weight"],
           "transformer.wpe.weight": sd["input_layer.wpe.weight"]}
    for i in range(config.n_layer):
        h, b = f"transformer.h.{i}.", f"encoder.blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[h + ln + ".weight"], out[h + ln + ".bias"] = sd[b + ln + ".weight"], sd[b + ln + ".bias"]
        qkv = ("query", "key", "value")
        out[h + "attn.c_attn.weight"] = torch.cat([sd[b + f"attn.{n}.weight"] for n in qkv]).t()  # (C, 3C)
        out[h + "attn.c_attn.bias"] = torch.cat([sd[b + f"attn.{n}.bias"] for n in qkv])
        out[h + "attn.c_proj.weight"] = sd[b + "attn.proj.weight"].t()
        out[h + "attn.c_proj.bias"] = sd[b + "attn.proj.bias"]
        out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = sd[b + "mlp.fc.weight"].t(), sd[b + "mlp.fc.bias"]
        out[h + "mlp.c_proj.weight"] = sd[b + "mlp.proj.weight"].t()
        out[h + "mlp.c_proj.bias"] = sd[b + "mlp.proj.bias"]
    out["transformer.ln_f.weight"] = sd["output_layer.ln_f.weight"]
    out["transformer.ln_f.bias"] = sd["output_layer.ln_f.bias"]
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_gpt2(model, folder, eos_token_id: int | None = None) -> Path:
    """Write a plain minigpt GPT (no PEFT method applied; merge_and_unload one first) as a GPT-2 folder:
    config.json + model.safetensors, each written atomically."""
    from safetensors.torch import save_file

    if getattr(model, "peft_config", None) is not None:
        raise ValueError("the model carries a PEFT method; save_gpt2 writes plain GPT-2 weights: call "
                         "peft.merge_and_unload(model) first, or save the adapter with peft.save_hf_adapter")
    folder = Path(folder)
    config = hf_config(model.config, eos_token_id)
    tensors = to_hf_state_dict(model.state_dict(), model.config)
    write_json(folder / "config.json", config, indent=2)
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return folder
