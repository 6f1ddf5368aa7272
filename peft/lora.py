"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Section 4.1).

A frozen weight W_0 (out, in) gets a trainable update of rank r << min(in, out), Delta W = B A (eq. 3):

    h = W_0 x + Delta W x = W_0 x + (alpha / r) B A x

            x (..., in)
            ├──────────────────────┐
            │                      dropout
        W_0 x + b  (frozen)        A: (r, in)    Kaiming-uniform
            │                      B: (out, r)   zeros, so B A = 0 and the model is unchanged at the start
            │                      * scaling
            └────────── + ─────────┘
                        h (..., out)

The paper scales Delta W x by alpha / r so that changing r needs little re-tuning of the learning rate. With
``use_rslora`` the scaling is alpha / sqrt(r) instead (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for
Fine-Tuning with LoRA"), which keeps the update's size from shrinking as r grows.

The paper draws A from a random Gaussian; like the authors' released code we use nn.Linear's default Kaiming-uniform
init (a = sqrt(5)). Either way B = 0 makes Delta W = 0 at the start, and A still gets gradients once B moves.

Merging folds scaling * B A into W_0, so a merged layer costs exactly what the original Linear costs (the paper's
"no additional inference latency"). Unmerging must give back W_0, but (W_0 + D) - D is not W_0 in floating point.
So ``merge`` keeps the pre-merge weight (a non-persistent buffer the size of W_0, held only while merged) and
``unmerge`` copies it back: exact, bit for bit, whatever happened to A and B in between.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", eq. 5), ``use_dora=True``: the adapted weight
is split into a magnitude and a direction, and the low-rank update only moves the direction:

    W' = m ⊙ (W_0 + scaling B A) / ||W_0 + scaling B A||_c          h = W' x + b

||.||_c is the norm of each vector of W that produces one output (the paper writes W as (in, out) and takes column
norms; in nn.Linear's (out, in) layout it is the norm of each row, torch.linalg.norm(W, dim=1), as huggingface peft
computes it). m (out,) is a trainable vector, initialised to ||W_0||_c, so W' = W_0 at the start (B = 0). As the
paper suggests (Section 4.3) and huggingface peft does, the norm is treated as a constant in the backward pass
(detached): gradients reach m, and A and B through the numerator only. Computed without forming W':

    h = W_0 x + b + (m / n - 1) ⊙ (W_0 x) + (m / n) ⊙ scaling B A x,      n = ||W_0 + scaling B A||_c (detached)

With lora_dropout in training, the two x's of the added terms are dropout(x), as in huggingface peft. Merging stores
W' = (m / n) ⊙ (W_0 + scaling B A) row by row; unmerging restores W_0 exactly, as for LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.options import option

from .base import AdapterLayer, MergeableLayer, find_modules, merge_all, name_list, replace_module, unmerge_all


@dataclass
class LoraConfig:
    """r: rank of the update; alpha: its scale (scaling = alpha / r); lora_dropout: dropout on the input of the
    low-rank branch; target_modules: nn.Linear modules to adapt, by name or name ending ("query", or
    "blocks.0.attn.query"); the paper's default adapts W_q and W_v. use_rslora: scaling = alpha / sqrt(r).
    use_dora: DoRA, a trained magnitude m times the normalised direction W_0 + scaling B A."""

    method = "lora"

    r: int = option(8, "LoRA: the rank r of the update B A")
    alpha: float = option(16.0, "LoRA: the update's scale alpha (scaling = alpha / r)")
    lora_dropout: float = option(0.0, "LoRA: dropout on the input of the low-rank branch")
    target_modules: list[str] = option(help="the modules the method adapts, by name or name ending",
                                       factory=lambda: ["query", "value"])
    use_rslora: bool = option(False, "LoRA: scaling = alpha / sqrt(r) (rank-stabilised)")
    use_dora: bool = option(False, "LoRA: DoRA, a trained magnitude times the normalised direction W_0 + B A")

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer (the rank of B A), got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be a positive number (scaling = alpha / r), got {self.alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)):
            raise ValueError(f"LoraConfig.lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.target_modules = name_list("LoraConfig.target_modules", self.target_modules)
        for field in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"LoraConfig.{field} must be True or False, got {getattr(self, field)!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraLinear(MergeableLayer):
    """h = W_0 x + b + scaling * B A dropout(x) around a frozen nn.Linear ``base`` (LoRA eq. 3); with use_dora,
    h = m ⊙ (W_0 + scaling B A) x / ||W_0 + scaling B A||_c + b (DoRA eq. 5)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float, use_dora: bool = False):
        super().__init__(base)
        if r > min(base.in_features, base.out_features):
            raise ValueError(
                f"LoRA rank r={r} exceeds min(in, out) = {min(base.in_features, base.out_features)} of a "
                f"Linear({base.in_features}, {base.out_features}); B A could not have rank r"
            )
        self.r, self.scaling = r, scaling
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.use_dora = use_dora
        if use_dora:  # m = ||W_0||_c: W' = W_0 at the start
            self.lora_magnitude = nn.Parameter(self.weight_norm().to(base.weight.dtype))  # (out,)

    def forward(self, x):
        h = self.base(x)  # W_0 x + b: (..., out)
        if self.disabled or self.merged:  # merged: W_0 already holds the update; A and B are not run
            return h
        dropped = self.lora_dropout(x)  # dropout on the input of the low-rank branch only
        z = dropped.to(self.lora_A.dtype) @ self.lora_A.T  # (..., in) -> (..., r)
        update = self.scaling * (z @ self.lora_B.T)  # (..., r) -> (..., out)
        if not self.use_dora:
            return h + update.to(h.dtype)
        scale = self.lora_magnitude / self.weight_norm()  # m / ||W_0 + scaling B A||_c: (out,)
        if self.lora_dropout.p == 0 or not self.training:
            base_out = h if self.base.bias is None else h - self.base.bias  # W_0 x
        else:
            base_out = F.linear(dropped, self.base.weight)  # W_0 dropout(x)
        return h + ((scale - 1) * base_out + scale * update).to(h.dtype)  # = scale ⊙ (W_0 + scaling B A) x + b

    def delta_weight(self) -> torch.Tensor:
        """Delta W = scaling * B A: (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def weight_norm(self) -> torch.Tensor:
        """DoRA's ||W_0 + scaling B A||_c: the norm of each output's weight vector (a row here), (out,), in float32
        and detached from the graph (a constant in the backward pass, DoRA Section 4.3)."""
        with torch.no_grad():
            return torch.linalg.norm(self.base.weight.float() + self.delta_weight().float(), dim=1)

    def merged_parameters(self):
        W = self.base.weight  # (out, in)
        merged = W.float() + self.delta_weight().float()  # summed in float32, stored in W's dtype
        if self.use_dora:  # W' = m ⊙ (W_0 + scaling B A) / ||W_0 + scaling B A||_c, row by row
            merged = (self.lora_magnitude.float() / self.weight_norm())[:, None] * merged
        return merged.to(W.dtype), None

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}{', DoRA' if self.use_dora else ''}, merged={self.merged}"


def apply(model: nn.Module, config: LoraConfig) -> None:
    """Wrap every target nn.Linear of model in a LoraLinear; only lora_A and lora_B are trainable (the rest was
    frozen by get_peft_model)."""
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("the model already carries PEFT layers; call peft.unload(model) before applying LoRA")
    names = find_modules(model, config.target_modules)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"LoRA adapts nn.Linear layers; target {name!r} is a {type(module).__name__}")
    for name in names:
        layer = LoraLinear(model.get_submodule(name), config.r, config.scaling, config.lora_dropout, config.use_dora)
        replace_module(model, name, layer)


def merge(model: nn.Module) -> None:
    """W_0 <- W_0 + scaling * B A in every LoRA layer; the forward pass then skips A and B."""
    merge_all(model, LoraLinear)


def unmerge(model: nn.Module) -> None:
    """Put the pre-merge weights W_0 back (exactly)."""
    unmerge_all(model, LoraLinear)
