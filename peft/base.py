"""What every PEFT method shares: the wrapper base class and the helpers that find and swap modules of a GPT.

A method patches a GPT in place by replacing some of its modules with an ``AdapterLayer`` that holds the original
module as ``base`` and adds the method's computation. Setting ``disabled`` makes the layer behave exactly like
``base`` (used by ``peft.disable_adapters``); ``peft.unload`` puts every ``base`` back.
"""

from __future__ import annotations

import torch.nn as nn


class AdapterLayer(nn.Module):
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
