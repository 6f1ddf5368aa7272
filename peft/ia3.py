"""IA3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", Section 3.3).

Three learned vectors per block rescale activations element-wise (the paper's equations in its notation):

    attention:  softmax(Q (l_k ⊙ K^T) / sqrt(d_k)) (l_v ⊙ V)
    MLP:        (l_ff ⊙ gamma(W_1 x)) W_2                     gamma: the nonlinearity (GELU here)

l_k and l_v have one entry per key / value channel (all heads side by side: n_embd entries), l_ff one per inner
MLP unit (4 n_embd). All start at ones, so the model is unchanged at the start.

Here that is done by wrapping Linear layers:
    attn.key, attn.value   k = l_k ⊙ (W_k x + b_k),  v = l_v ⊙ (W_v x + b_v)   (scale the output)
    mlp.proj               W_2 (l_ff ⊙ h) + b_2,  h = GELU(W_1 x + b_1)          (scale the input)

Merging folds each vector into its weight: scaling the output of y = W x + b by l scales the rows of W and the
entries of b (l ⊙ y = diag(l) W x + diag(l) b); scaling the input scales the columns of W (W diag(l)). As with LoRA,
``merge`` keeps the pre-merge weight and bias, and ``unmerge`` copies them back, which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from minigpt.options import option

from .base import AdapterLayer, MergeableLayer, find_modules, merge_all, name_list, replace_module, unmerge_all


@dataclass
class IA3Config:
    """target_modules: nn.Linear modules to rescale, by name or name ending; feedforward_modules: those among them
    whose input is rescaled (l_ff, the MLP's inner activation), the others have their output rescaled (l_k, l_v)."""

    method = "ia3"

    target_modules: list[str] = option(help="the modules the method adapts, by name or name ending",
                                       factory=lambda: ["attn.key", "attn.value", "mlp.proj"])
    feedforward_modules: list[str] = option(help="IA3: the targets whose input is rescaled (l_ff)",
                                            factory=lambda: ["mlp.proj"])

    def __post_init__(self):
        self.target_modules = name_list("IA3Config.target_modules", self.target_modules)
        ff = self.feedforward_modules
        if not isinstance(ff, (list, tuple)):
            raise ValueError(f"IA3Config.feedforward_modules must be a list of module names (may be empty), got {ff!r}")
        self.feedforward_modules = name_list("IA3Config.feedforward_modules", ff) if ff else []


class IA3Linear(MergeableLayer):
    """l ⊙ (W x + b) (keys, values) or W (l ⊙ x) + b (the MLP's W_2, l = l_ff) around a frozen nn.Linear ``base``.

    The vector is registered under the paper's name (l_k, l_v or l_ff), so it shows up as e.g.
    ``encoder.blocks.0.attn.key.l_k`` in the parameter list and in saved adapters.
    """

    def __init__(self, base: nn.Linear, vector_name: str, scale_input: bool):
        super().__init__(base)
        self.vector_name, self.scale_input = vector_name, scale_input
        n = base.in_features if scale_input else base.out_features
        ones = torch.ones(n, device=base.weight.device, dtype=base.weight.dtype)
        self.register_parameter(vector_name, nn.Parameter(ones))  # (in,) or (out,)

    @property
    def vector(self) -> nn.Parameter:
        return getattr(self, self.vector_name)

    def forward(self, x):
        if self.disabled or self.merged:  # merged: W already holds the scaling
            return self.base(x)
        if self.scale_input:  # computed in the wider of the two dtypes, then back to the model's
            return self.base((x * self.vector).to(x.dtype))  # (..., in) ⊙ (in,) -> (..., out)
        h = self.base(x)
        return (h * self.vector).to(h.dtype)  # (..., out) ⊙ (out,)

    def merged_parameters(self):
        W, b, l = self.base.weight, self.base.bias, self.vector  # W: (out, in)
        if self.scale_input:
            return W * l[None, :], None  # W diag(l): column j times l_j; the bias is not affected
        return W * l[:, None], None if b is None else b * l  # diag(l) W: row i times l_i; the bias too

    def extra_repr(self) -> str:
        return f"{self.vector_name}: scales the {'input' if self.scale_input else 'output'}, merged={self.merged}"


def _vector_name(module_name: str, feedforward: bool) -> str:
    if feedforward:
        return "l_ff"
    return {"key": "l_k", "value": "l_v", "query": "l_q"}.get(module_name.rsplit(".", 1)[-1], "l")


def apply(model: nn.Module, config: IA3Config) -> None:
    """Wrap the target Linear layers in IA3Linear; only the vectors l_k, l_v, l_ff are trainable."""
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("the model already carries PEFT layers; call peft.unload(model) before applying IA3")
    names = find_modules(model, config.target_modules)
    feedforward = find_modules(model, config.feedforward_modules) if config.feedforward_modules else []
    extra = [n for n in feedforward if n not in names]
    if extra:
        raise ValueError(f"IA3Config.feedforward_modules must be among target_modules; {extra} are not")
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"IA3 rescales nn.Linear layers; target {name!r} is a {type(module).__name__}")
    for name in names:
        ff = name in feedforward
        replace_module(model, name, IA3Linear(model.get_submodule(name), _vector_name(name, ff), scale_input=ff))


def merge(model: nn.Module) -> None:
    """Fold l_k, l_v into the rows of W_k, W_v (and their biases) and l_ff into the columns of W_2."""
    merge_all(model, IA3Linear)


def unmerge(model: nn.Module) -> None:
    """Put the pre-merge weights and biases back (exactly)."""
    unmerge_all(model, IA3Linear)
