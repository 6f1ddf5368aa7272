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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from minigpt.options import option

from .base import AdapterLayer, MergeableLayer, find_modules, merge_all, name_list, replace_module, unmerge_all


@dataclass
class LoraConfig:
    """r: rank of the update; alpha: its scale (scaling = alpha / r); lora_dropout: dropout on the input of the
    low-rank branch; target_modules: nn.Linear modules to adapt, by name or name ending ("query", or
    "blocks.0.attn.query"); the paper's default adapts W_q and W_v. use_rslora: scaling = alpha / sqrt(r)."""

    method = "lora"

    r: int = option(8, "LoRA: the rank r of the update B A")
    alpha: float = option(16.0, "LoRA: the update's scale alpha (scaling = alpha / r)")
    lora_dropout: float = option(0.0, "LoRA: dropout on the input of the low-rank branch")
    target_modules: list[str] = option(help="the modules the method adapts, by name or name ending", factory=lambda: ["query", "value"])
    use_rslora: bool = option(False, "LoRA: scaling = alpha / sqrt(r) (rank-stabilised)")

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

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraLinear(MergeableLayer):
    """h = W_0 x + b + scaling * B A dropout(x) around a frozen nn.Linear ``base`` (LoRA eq. 3)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float):
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

    def forward(self, x):
        h = self.base(x)  # W_0 x + b: (..., out)
        if self.disabled or self.merged:  # merged: W_0 already holds the update; A and B are not run
            return h
        z = self.lora_dropout(x) @ self.lora_A.T  # (..., in) -> (..., r)
        return h + self.scaling * (z @ self.lora_B.T)  # (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        """Delta W = scaling * B A: (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def merged_parameters(self):
        W = self.base.weight  # (out, in)
        return (W.float() + self.delta_weight().float()).to(W.dtype), None  # summed in float32, stored in W's dtype

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


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
        layer = LoraLinear(model.get_submodule(name), config.r, config.scaling, config.lora_dropout)
        replace_module(model, name, layer)


def merge(model: nn.Module) -> None:
    """W_0 <- W_0 + scaling * B A in every LoRA layer; the forward pass then skips A and B."""
    merge_all(model, LoraLinear)


def unmerge(model: nn.Module) -> None:
    """Put the pre-merge weights W_0 back (exactly)."""
    unmerge_all(model, LoraLinear)
