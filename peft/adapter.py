"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", Section 2.1, Fig. 2).

An adapter is a small bottleneck network with a skip connection, inserted after a sub-layer's output projection,
before that sub-layer's residual add:

    adapter(h) = h + W_up f(W_down h + b_down) + b_up       h: (B, T, d)
                 W_down: (m, d), m = d // reduction_factor;   W_up: (d, m)

Houlsby et al. put one after the attention's output projection and one after the MLP ("houlsby" placement);
Pfeiffer et al. 2021 ("AdapterFusion") keep only the one after the MLP ("pfeiffer" placement). Per adapter
2 m d + m + d parameters are trained.

Here ``block.attn`` and ``block.mlp`` are wrapped, and the adapter acts on what they return, so the block computes

    pre_ln:   x = x + adapter(attn(LN_1(x)));   x = x + adapter(mlp(LN_2(x)))
    post_ln:  x = LN_1(x + adapter(attn(x)));   x = LN_2(x + adapter(mlp(x)))

which is the paper's placement for either layout. The nonlinearity f is GELU by default, as in the authors' released
code, and in its form: BERT's tanh approximation (whichever GELU the base's MLP computes). Near-identity
initialisation: W_down is drawn from a normal distribution with a small standard deviation ``init_scale`` (1e-3,
truncated at two standard deviations, as in the authors' code); W_up and both biases start at zero, so the adapter
is exactly the identity at the start while W_up receives gradients at once.

The paper also trains the layer normalisation parameters (Figure 2: the trained layers are the adapters and the
layer norms): ``train_layernorm=True`` does so, for every LayerNorm of the model (each block's ln_1 and ln_2, and the
final ln_f). It is off by default (the adapters alone train). The LayerNorms are the base's
own tensors, trained in place: a frozen copy of each is kept (``base.train_in_place``), so ``peft.disable_adapters``
still gives the base model and ``peft.unload`` restores it. Adapters are nonlinear, so they cannot be merged into
the base weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from minigpt.options import option

from .base import AdapterLayer, train_in_place

ACTIVATIONS = {
    "gelu": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}
PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}


@dataclass
class AdapterConfig:
    """reduction_factor: d / m, the bottleneck is m = n_embd // reduction_factor wide; non_linearity: f, one of
    ACTIVATIONS; placement: "houlsby" (after attention and after the MLP) or "pfeiffer" (after the MLP only);
    init_scale: standard deviation of W_down's truncated normal initialisation; train_layernorm: also train every
    LayerNorm's gain and bias, as the paper does."""

    method = "adapter"

    reduction_factor: int = option(16, "adapters: the bottleneck is n_embd // reduction_factor wide")
    non_linearity: str = option("gelu", "adapters: the bottleneck's nonlinearity (gelu: BERT's tanh form; relu, swish, "
                                "tanh)")
    placement: str = option("houlsby", "adapters: houlsby (after attention and MLP) or pfeiffer (after the MLP)")
    init_scale: float = option(1e-3, "adapters: std of W_down's truncated normal initialisation")
    train_layernorm: bool = option(False, "adapters: also train the LayerNorms (Houlsby et al. do)")

    def __post_init__(self):
        rf = self.reduction_factor
        if not isinstance(rf, int) or isinstance(rf, bool) or rf < 1:
            raise ValueError(f"AdapterConfig.reduction_factor must be an integer >= 1 (d / m), got {rf!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(
                f"AdapterConfig.non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}"
            )
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig.placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        scale = self.init_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"AdapterConfig.init_scale must be a positive number, got {self.init_scale!r}")
        if not isinstance(self.train_layernorm, bool):
            raise ValueError(f"AdapterConfig.train_layernorm must be True or False, got {self.train_layernorm!r}")


class BottleneckAdapter(AdapterLayer):
    """h + W_up f(W_down h + b_down) + b_up applied to the output h of ``base`` (a block's attn or mlp)."""

    def __init__(self, base: nn.Module, d: int, m: int, non_linearity: str, init_scale: float):
        super().__init__(base)
        like = next(base.parameters())
        kw = {"device": like.device, "dtype": like.dtype}
        self.adapter_down = nn.Linear(d, m, **kw)  # W_down, b_down
        self.act = ACTIVATIONS[non_linearity]()  # f
        self.adapter_up = nn.Linear(m, d, **kw)  # W_up, b_up
        nn.init.trunc_normal_(self.adapter_down.weight, std=init_scale, a=-2 * init_scale, b=2 * init_scale)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # W_up = 0, b_up = 0: the adapter starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, *args, **kwargs):
        h = self.base(*args, **kwargs)  # the sub-layer's output: (B, T, d)
        if self.disabled:
            return h
        z = h.to(self.adapter_down.weight.dtype)  # the adapter's own dtype (float32 with fp32_adapter)
        # (B, T, d) -> (B, T, m) -> (B, T, d)
        return h + self.adapter_up(self.act(self.adapter_down(z))).to(h.dtype)


def apply(model: nn.Module, config: AdapterConfig) -> None:
    """Wrap each block's attn and/or mlp (per ``placement``) in a BottleneckAdapter; only the adapters train (and,
    with train_layernorm, the LayerNorms)."""
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("the model already carries PEFT layers; call peft.unload(model) before adding adapters")
    d = model.config.n_embd
    m = d // config.reduction_factor
    if m < 1:
        raise ValueError(
            f"AdapterConfig.reduction_factor={config.reduction_factor} leaves no bottleneck for n_embd={d}; "
            f"expected reduction_factor <= {d}"
        )
    for block in model.encoder.blocks:
        for part in PLACEMENTS[config.placement]:
            adapter = BottleneckAdapter(getattr(block, part), d, m, config.non_linearity, config.init_scale)
            setattr(block, part, adapter)  # block.attn or block.mlp, now returning adapter(sub-layer output)
    if config.train_layernorm:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                train_in_place(m, ["weight", "bias"], "adapter")  # gain and bias, each with a frozen copy
