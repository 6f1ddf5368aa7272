"""Parameter-efficient fine-tuning (PEFT) of a minigpt GPT, each method written from its paper.

    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, alpha=16))   # patches the GPT in place
    peft.count_parameters(model)                # (trainable, total)
    peft.merge(model); peft.unmerge(model)      # LoRA and IA3: fold the update into the base weights and back
    with peft.disable_adapters(model): ...      # the base model's outputs, without a second copy in memory
    peft.save_adapter(model, "adapter.safetensors"); peft.load_adapter(base_model, "adapter.safetensors")
    peft.unload(model)                          # the original modules back
    peft.merge_and_unload(model)                # LoRA, DoRA, IA3, BitFit: a plain GPT with the update folded in
    with peft.task_ids(model, [2, 0]): ...      # prompt methods: row b uses task ids[b]'s prompt (mixed-task batch)
    peft.save_hf_adapter(model, "folder")       # huggingface peft's format (adapter_config.json + safetensors)
    peft.load_hf_adapter(base_model, "folder")  # and back (see peft/hf.py for what maps and what is refused)

The methods: BitFit, Prompt Tuning, P-Tuning (v1), Prefix-Tuning, P-Tuning v2, LoRA (and DoRA), IA3 and Houlsby
adapters. This package is imported as ``peft``, like Hugging Face's: do not install both into one environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import torch
import torch.nn as nn

from minigpt.files import atomic_write

from . import adapter, base, bitfit, ia3, lora, p_tuning, prefix_tuning, prompt_tuning
from .adapter import AdapterConfig
from .base import AdapterLayer, Float32Adapter
from .bitfit import BitFitConfig
from .ia3 import IA3Config
from .lora import LoraConfig
from .p_tuning import PTuningConfig
from .prefix_tuning import PrefixTuningConfig, PTuningV2Config
from .prompt_tuning import PromptTuningConfig, task_ids

METHODS = {
    BitFitConfig: bitfit,
    PromptTuningConfig: prompt_tuning,
    PTuningConfig: p_tuning,
    PrefixTuningConfig: prefix_tuning,
    PTuningV2Config: prefix_tuning,
    LoraConfig: lora,
    IA3Config: ia3,
    AdapterConfig: adapter,
}
CONFIGS = {cls.method: cls for cls in METHODS}  # "lora" -> LoraConfig, ...

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "BitFitConfig",
    "IA3Config",
    "LoraConfig",
    "PTuningConfig",
    "PTuningV2Config",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "CONFIGS",
    "can_merge",
    "count_parameters",
    "disable_adapters",
    "get_peft_model",
    "load_adapter",
    "load_hf_adapter",
    "merge",
    "merge_and_unload",
    "save_adapter",
    "save_hf_adapter",
    "task_ids",
    "unload",
    "unmerge",
]


def get_peft_model(model: nn.Module, config, fp32_adapter: bool = False) -> nn.Module:
    """Patch model in place with the method config describes, freeze everything the method does not train,
    and return the model (the same object).

    fp32_adapter: the method's own tensors are made float32 and stay float32 when the model is cast later
    (``model.to(torch.bfloat16)``), as huggingface peft keeps them; the frozen base follows the cast. Tensors of the
    base trained in place (BitFit's biases, adapters' LayerNorms) are the base's and follow it."""
    if type(config) not in METHODS:
        raise TypeError(f"expected one of {[c.__name__ for c in METHODS]}, got {type(config).__name__}")
    if getattr(model, "peft_config", None) is not None:
        raise ValueError(
            f"the model already carries a {model.peft_config.method!r} adapter; call peft.unload(model) first"
        )
    if not hasattr(model, "encoder") or not hasattr(model, "input_layer"):
        raise TypeError(f"peft methods patch a minigpt GPT; got a {type(model).__name__}")
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        METHODS[type(config)].apply(model, config)
    except Exception:  # a refused config leaves the model as it was
        for p, flag in was_trainable.items():
            p.requires_grad_(flag)
        raise
    if fp32_adapter:
        for m in model.modules():
            if isinstance(m, Float32Adapter):
                m.keep_float32 = True
                m.to_float32()
    model.peft_config = config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of distinct parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def _method_module(model):
    config = getattr(model, "peft_config", None)
    if config is None:
        raise ValueError("the model carries no PEFT method; call peft.get_peft_model first")
    return METHODS[type(config)]


def can_merge(model: nn.Module) -> bool:
    """Whether the model carries a method whose update folds into the base weights (LoRA, DoRA, IA3)."""
    config = getattr(model, "peft_config", None)
    return config is not None and hasattr(METHODS[type(config)], "merge")


def merge(model: nn.Module) -> None:
    """Fold the method's update into the base weights (LoRA, IA3): same outputs, no extra inference cost."""
    module = _method_module(model)
    if not hasattr(module, "merge"):
        raise ValueError(f"{model.peft_config.method!r} cannot be merged into the base weights "
                         "(only LoRA, DoRA and IA3)")
    module.merge(model)


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``: the base weights return to their values before it."""
    module = _method_module(model)
    if not hasattr(module, "unmerge"):
        raise ValueError(f"{model.peft_config.method!r} cannot be merged into the base weights "
                         "(only LoRA, DoRA and IA3)")
    module.unmerge(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes what its base model computes (PPO uses this as the reference model):
    every wrapper layer is switched off and every tensor trained in place is swapped for its original. Blocks may
    be nested: leaving the inner one leaves the adapters off until the outer one ends."""
    _method_module(model)
    layers = adapter_layers(model)
    if any(layer.merged for layer in layers):
        raise ValueError("disable_adapters on a merged model: call peft.unmerge(model) first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        with base.originals_swapped_in(model):
            yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


def unload(model: nn.Module) -> nn.Module:
    """Remove the method: unmerge if merged, put the original modules and tensors back, make every parameter
    trainable."""
    module = _method_module(model)
    if hasattr(module, "unload"):  # what the method adds besides wrapper layers (the prefix encoder)
        module.unload(model)
    _put_base_modules_back(model, unmerge=True)
    base.restore_originals(model)
    return _plain(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """LoRA, DoRA, IA3: fold the update into the base weights for good and put the plain modules back; BitFit: keep
    the trained biases (they are the base's own tensors). The result is a plain GPT with the fine-tuned model's
    outputs and the base model's cost; the adapter cannot be taken out again."""
    module = _method_module(model)
    if hasattr(module, "merge"):
        merge(model)
    elif not getattr(module, "TRAINS_BASE_TENSORS_ONLY", False):
        raise ValueError(f"{model.peft_config.method!r} cannot be merged into the base weights (only LoRA, DoRA, "
                         "IA3 and BitFit can be merged and unloaded)")
    _put_base_modules_back(model, unmerge=False)
    base.keep_trained_values(model)
    return _plain(model)


def _put_base_modules_back(model: nn.Module, unmerge: bool) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, AdapterLayer) and name:
            if unmerge and m.merged:
                m.unmerge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)


def _plain(model: nn.Module) -> nn.Module:
    model.peft_config = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# -- saving and loading adapters ---------------------------------------------------------------------------

# what an adapter depends on in its base: the shape, and the GELU (weights of the same shapes fit a base with the
# other one); a file saved before activation was recorded was saved for GPT-2's tanh GELU, the GPTConfig default
_BASE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "layout", "activation")
_BASE_BEFORE_ACTIVATION = {"activation": "gelu_tanh"}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the method owns, by name (only these are saved), whether or not they require gradients now."""
    _method_module(model)
    owned = base.owned_names(model)
    return {n: p.detach() for n, p in model.named_parameters() if n in owned}


def save_adapter(model: nn.Module, path) -> None:
    """Write the trained tensors and the method's config to a safetensors file (atomically)."""
    from safetensors.torch import save_file

    config = getattr(model, "peft_config", None)
    if config is None:
        raise ValueError("the model carries no PEFT method; nothing to save")
    tensors = {n: t.contiguous().cpu() for n, t in adapter_state_dict(model).items()}
    base = {k: getattr(model.config, k) for k in _BASE_FIELDS}
    metadata = {"method": config.method, "config": json.dumps(dataclasses.asdict(config)), "base": json.dumps(base)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_adapter_config(path):
    """The config stored in an adapter file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "method" not in meta or meta["method"] not in CONFIGS:
        raise ValueError(f"{path} is not an adapter file written by peft.save_adapter")
    saved_for = {**_BASE_BEFORE_ACTIVATION, **json.loads(meta["base"])}
    return CONFIGS[meta["method"]](**json.loads(meta["config"])), saved_for


def load_adapter(model: nn.Module, path, fp32_adapter: bool = False) -> nn.Module:
    """Apply the method saved in path to model (a plain GPT, or one already patched with the same config) and load
    its tensors. A file saved for a base model of another shape or GELU is refused. fp32_adapter: as in
    get_peft_model."""
    from safetensors.torch import load_file

    config, saved_for = read_adapter_config(path)
    mine = {k: getattr(model.config, k) for k in _BASE_FIELDS}
    if saved_for != mine:
        diff = {k: (saved_for[k], mine[k]) for k in saved_for if saved_for[k] != mine.get(k)}
        raise ValueError(f"{path} was saved for another base model; (saved, this model) differ in {diff}")
    return apply_with_tensors(model, config, load_file(str(path)), path, fp32_adapter)


def apply_with_tensors(model: nn.Module, config, tensors: dict, source, fp32_adapter: bool = False) -> nn.Module:
    """Apply config to model (unless it carries it already) and copy tensors, named as adapter_state_dict names
    them, into the method's tensors; the names and shapes must match exactly. source names the file in errors."""
    if getattr(model, "peft_config", None) is None:
        get_peft_model(model, config, fp32_adapter=fp32_adapter)
    elif model.peft_config != config:
        raise ValueError(f"the model carries {model.peft_config}, but {source} holds {config}")
    if any(layer.merged for layer in adapter_layers(model)):
        raise ValueError("loading an adapter into a merged model: call peft.unmerge(model) first")
    params = dict(model.named_parameters())
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        raise ValueError(
            f"{source} holds tensors {sorted(set(tensors) - expected)[:5]} the model lacks, "
            f"and lacks {sorted(expected - set(tensors))[:5]}"
        )
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise ValueError(f"tensor {name!r}: file has shape {tuple(t.shape)}, model {tuple(params[name].shape)}")
            params[name].copy_(t)
    return model


from .hf import load_hf_adapter, save_hf_adapter  # noqa: E402  (hf uses the functions above)
