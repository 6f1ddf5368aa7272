"""What every PEFT method shares: the wrapper base class and the helpers that find and swap modules of a GPT.

A method patches a GPT in place by replacing some of its modules with an ``AdapterLayer`` that holds the original
module as ``base`` and adds the method's computation. Setting ``disabled`` makes the layer behave exactly like
``base`` (used by ``peft.disable_adapters``); ``peft.unload`` puts every ``base`` back.

A method may also train some of the base model's own tensors in place (BitFit its biases, Houlsby adapters
optionally the LayerNorms). ``train_in_place`` keeps a frozen copy of each such tensor (a non-persistent buffer named
``<method>_original_<name>`` on its module, e.g. ``bitfit_original_bias``), so that ``peft.disable_adapters`` can
swap the originals in and ``peft.unload`` can put them back.

What a method owns (what ``peft.save_adapter`` writes) is found from the structure, never from ``requires_grad``:
the parameters of every AdapterLayer outside its ``base``, those of a module marked ``peft_module = True`` (the
prefix encoder, shared by the layers), and the tensors trained in place.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

# <method>_original_<parameter>: the buffer holding the frozen copy of a tensor trained in place
ORIGINAL = "_original_"


class Float32Adapter:
    """A mixin for a module holding a method's tensors: with ``keep_float32`` set (``get_peft_model(...,
    fp32_adapter=True)``) its own tensors stay float32 when the model is cast (``model.to(torch.bfloat16)``), as
    huggingface peft keeps adapter weights by default; the base module (``base``) follows the cast as usual. The
    method's forward casts its input to its tensors' dtype and its result back to the model's."""

    keep_float32 = False

    def own_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def to_float32(self) -> None:
        for p in self.own_parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # device and dtype for everything, the base included
        if self.keep_float32:
            self.to_float32()  # then this module's own tensors back to float32 (the device change stays)
        return self


class AdapterLayer(Float32Adapter, nn.Module):
    """A module that wraps ``base`` (the original module) and adds a PEFT method's computation.

    Subclasses implement ``forward`` and must return ``self.base(...)``'s result unchanged when ``self.disabled``.
    Methods whose update folds into the base weights (LoRA, IA3) also implement ``merge`` and ``unmerge`` and keep
    ``self.merged`` up to date.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.disabled = False
        self.merged = False

    def merge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")


class MergeableLayer(AdapterLayer):
    """An AdapterLayer around an nn.Linear whose update folds into the Linear's own weight and bias (LoRA, IA3).

    Subclasses give ``merged_parameters()``: what base.weight and base.bias become (bias None: unchanged).
    ``merge`` keeps the pre-merge tensors (non-persistent buffers, held only while merged) and ``unmerge`` copies
    them back, because (W + D) - D is not W in floating point: unmerging is exact, bit for bit.
    """

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        self.register_buffer("weight_before_merge", None, persistent=False)
        self.register_buffer("bias_before_merge", None, persistent=False)

    def merged_parameters(self):
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError(f"this {type(self).__name__} is already merged")
        weight, bias = self.merged_parameters()
        self.weight_before_merge = self.base.weight.detach().clone()
        self.base.weight.copy_(weight)
        if bias is not None:
            self.bias_before_merge = self.base.bias.detach().clone()
            self.base.bias.copy_(bias)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError(f"this {type(self).__name__} is not merged")
        self.base.weight.copy_(self.weight_before_merge)
        if self.bias_before_merge is not None:
            self.base.bias.copy_(self.bias_before_merge)
        self.weight_before_merge = self.bias_before_merge = None
        self.merged = False


def merge_all(model: nn.Module, layer_type: type) -> None:
    """Merge every layer_type layer of model; refused if any is merged already or adapts a tied weight (the GPT's
    head shares the token embedding: merging into one would change the other)."""
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    if not layers:
        raise ValueError(f"the model has no {layer_type.__name__} layers")
    if any(layer.merged for layer in layers):
        raise ValueError("the adapter is already merged; call peft.unmerge(model) first")
    for layer in layers:
        tied = tied_names(model, layer.base.weight)
        if len(tied) > 1:
            raise ValueError(f"cannot merge into a tied weight {tied}: merging would change all of them")
    for layer in layers:
        layer.merge()


def unmerge_all(model: nn.Module, layer_type: type) -> None:
    """Put back the pre-merge weights of every layer_type layer (exactly)."""
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    if not layers:
        raise ValueError(f"the model has no {layer_type.__name__} layers")
    if not all(layer.merged for layer in layers):
        raise ValueError("the adapter is not merged; nothing to unmerge")
    for layer in layers:
        layer.unmerge()


def get_submodule_parent(model: nn.Module, name: str):
    """(parent module, attribute name) of the submodule called name, e.g. 'encoder.blocks.0.attn.query'."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def name_list(what: str, names) -> list[str]:
    """Check a config's list of module names and return it as a list (a tuple would not survive a JSON round trip
    unchanged)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"{what} must be a non-empty list of module names, e.g. ['query', 'value'], got {names!r}")
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{what} must hold non-empty strings, got {names!r}")
    return list(names)


def tied_names(model: nn.Module, tensor) -> list[str]:
    """Every name under which tensor is a parameter of model: more than one when weights are tied (the GPT's output
    head shares the token embedding), so changing it in place would change the other module too."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is tensor]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def find_modules(model: nn.Module, targets, module_type=nn.Module) -> list[str]:
    """Names of the modules of module_type whose name equals a target or ends with '.' + target.

    targets such as ["query", "value"] match every block's attention projections; "blocks.0.attn.query" matches one.
    A target that matches nothing raises a ValueError listing the names that could have matched.
    """
    candidates = [n for n, m in model.named_modules() if isinstance(m, module_type) and n]
    found = []
    for target in targets:
        hits = [n for n in candidates if n == target or n.endswith("." + target)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise ValueError(
                f"target module {target!r} matches no {module_type.__name__} in the model; "
                f"names that could match: {short}"
            )
        found.extend(h for h in hits if h not in found)
    return found


# -- tensors of the base model trained in place -----------------------------------------------------------------


def train_in_place(module: nn.Module, names, method: str) -> None:
    """Make module's parameters ``names`` trainable, keeping a frozen copy of each as a non-persistent buffer
    ``<method>_original_<name>`` (it follows the module across devices and dtypes). A missing parameter (None, e.g.
    a LayerNorm without bias) is skipped."""
    for name in names:
        p = getattr(module, name)
        if p is None:
            continue
        module.register_buffer(f"{method}{ORIGINAL}{name}", p.detach().clone(), persistent=False)
        p.requires_grad_(True)


def trained_in_place(model: nn.Module) -> list[tuple[str, nn.Module, str, str]]:
    """(module name, module, parameter name, buffer name) of every base tensor a method trains in place."""
    found = []
    for name, m in model.named_modules():
        for b, _ in m.named_buffers(recurse=False):
            param = b.partition(ORIGINAL)[2]
            if param and param in m._parameters:
                found.append((name, m, param, b))
    return found


@contextlib.contextmanager
def originals_swapped_in(model: nn.Module):
    """Within the block every tensor trained in place is replaced by its original (a frozen Parameter sharing the
    saved copy's memory). The trained Parameter objects are put back afterwards, untouched: swapping objects instead
    of copying values leaves autograd graphs built before the block valid. Nested blocks are fine."""
    entries = trained_in_place(model)
    trained = [getattr(m, p) for _, m, p, _ in entries]
    try:
        for _, m, p, b in entries:
            setattr(m, p, nn.Parameter(getattr(m, b), requires_grad=False))
        yield model
    finally:
        for (_, m, p, _), tensor in zip(entries, trained):
            setattr(m, p, tensor)


def restore_originals(model: nn.Module) -> None:
    """Copy the originals back into the trained Parameters and drop the saved copies (``peft.unload``)."""
    with torch.no_grad():
        for _, m, p, b in trained_in_place(model):
            getattr(m, p).copy_(getattr(m, b))
            delattr(m, b)


def keep_trained_values(model: nn.Module) -> None:
    """Drop the saved originals and keep the trained values for good (``peft.merge_and_unload`` of BitFit)."""
    for _, m, _, b in trained_in_place(model):
        delattr(m, b)


def owned_names(model: nn.Module) -> set[str]:
    """Names (as in model.named_parameters()) of every tensor the method owns; see the module docstring."""
    names = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, AdapterLayer):
            names |= {prefix + n for n, _ in m.named_parameters() if not n.startswith("base.")}
        elif getattr(m, "peft_module", False):
            names |= {prefix + n for n, _ in m.named_parameters()}
    names |= {(f"{name}." if name else "") + p for name, _, p, _ in trained_in_place(model)}
    return names
