"""Prefix-Tuning (Li & Liang 2021) and P-Tuning v2 (Liu et al. 2022): learned keys and values in every layer.

Prefix-Tuning prepends a prefix of n = num_virtual_tokens positions to every layer. Its activations are free
parameters P_theta rather than the output of the frozen model (Section 4.2):

    h_i = P_theta[i, :]            if i is a prefix position
    h_i = LM_phi(z_i, h_{<i})      otherwise

In a Transformer the only activations of the prefix that later tokens read are its keys and values, so each layer l
holds K_prefix^l, V_prefix^l (n, C) and attends over them in front of the real keys:

    head = softmax(q [K_prefix; K]^T / sqrt(d_k)) [V_prefix; V]

where every real query sees every prefix position and the real part stays causal. The prefix takes no positions:
real tokens keep theirs and the context does not shrink. P_theta holds n * n_layer * 2 * C numbers.

Reparameterisation (Section 4.3). Optimising P_theta directly is unstable, so the paper trains a smaller matrix
P'_theta (n, d') and a large MLP, P_theta[i, :] = MLP_theta(P'_theta[i, :]), with the MLP's output of width
n_layer * 2 * C cut into each layer's key and value. After training only P_theta is kept: ``export(model)`` stores
the computed prefix as plain per-layer parameters and drops P' and the MLP, with identical outputs.

P-Tuning v2 ("deep prompt tuning") is the same mechanism with continuous prompts in every layer and, by default, no
reparameterisation; ``PTuningV2Config`` only changes that default. With num_tasks = K every prefix is (K, n, C) and
each row picks its task with ``peft.task_ids`` (see prompt_tuning).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.options import option

from .base import AdapterLayer
from .prompt_tuning import check_int, select_tasks


@dataclass
class PrefixTuningConfig:
    """num_virtual_tokens: the prefix length n. prefix_projection: train through P' and an MLP (Section 4.3).
    prefix_dim: d', the width of P' (None: n_embd, as in the authors' code). encoder_hidden_size: the MLP's hidden
    width (None: n_embd; the paper used 512 and 800). num_tasks: prefixes held for mixed-task batches."""

    method = "prefix_tuning"
    num_virtual_tokens: int = option(20, "prompt methods: the number n of virtual tokens")
    prefix_projection: bool = option(True, "prefix-tuning: train the prefix through P' and an MLP (p-tuning v2: "
                                     "off by default)")
    prefix_dim: int | None = option(None, "prefix-tuning: the width d' of P' (none: n_embd)")
    encoder_hidden_size: int | None = option(None, "p-tuning, prefix-tuning: the encoder's hidden width "
                                             "(none: n_embd)")
    num_tasks: int = option(1, "prompt methods: prompts held for mixed-task batches")

    def __post_init__(self):
        name = type(self).__name__
        check_int(name, "num_virtual_tokens", self.num_virtual_tokens)
        check_int(name, "num_tasks", self.num_tasks)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"{name}.prefix_projection must be True or False, got {self.prefix_projection!r}")
        for field in ("prefix_dim", "encoder_hidden_size"):
            if getattr(self, field) is not None:
                check_int(name, field, getattr(self, field))


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-Tuning v2: deep prompts in every layer, trained directly (no reparameterisation) unless asked."""

    method = "p_tuning_v2"
    prefix_projection: bool = option(False, "prefix-tuning: train the prefix through P' and an MLP")


class PrefixEncoder(nn.Module):
    """P_theta = MLP_theta(P'_theta): P' (K, n, d') -> Linear -> tanh -> Linear -> (K, n, n_layer * 2 * C)."""

    def __init__(self, config: PrefixTuningConfig, n_layer: int, n_embd: int, device=None):
        super().__init__()
        K, n, C = config.num_tasks, config.num_virtual_tokens, n_embd
        d, H = config.prefix_dim or n_embd, config.encoder_hidden_size or n_embd
        self.n_embd = C
        self.embedding = nn.Parameter(torch.randn(K, n, d, device=device))  # P'
        self.mlp = nn.Sequential(
            nn.Linear(d, H, device=device), nn.Tanh(), nn.Linear(H, n_layer * 2 * C, device=device)
        )

    def forward(self, layer: int):
        """Layer l's key and value prefixes, (K, n, C) each: only that layer's 2C rows of the last Linear are used,
        so the n_layer layers together cost one pass of the MLP."""
        C = self.n_embd
        hidden = self.mlp[1](self.mlp[0](self.embedding))  # (K, n, H)
        out = self.mlp[2]
        rows = slice(2 * C * layer, 2 * C * (layer + 1))  # the output is laid out (n_layer, key/value, C)
        kv = F.linear(hidden, out.weight[rows], out.bias[rows])  # (K, n, 2C)
        return kv[..., :C], kv[..., C:]


class PrefixAttention(AdapterLayer):
    """CausalSelfAttention with a learned prefix in front of its keys and values: softmax(q [K_p; K]^T) [V_p; V].

    The prefix is either this layer's own parameters ``prefix_key``, ``prefix_value`` (K, n, C), or, while training
    with reparameterisation, this layer's slice of the model-wide ``PrefixEncoder``.
    """

    def __init__(self, base: nn.Module, config: PrefixTuningConfig, layer: int, encoder: PrefixEncoder | None):
        super().__init__(base)
        K, n, C = config.num_tasks, config.num_virtual_tokens, base.query.in_features
        self.layer = layer
        self.prefix_length = n
        self.num_tasks = K
        self.task_ids = None  # (B,) task of each row, set by ``task_ids``; None with a single task
        # a plain reference, not a submodule: the encoder's parameters are registered once, as model.prefix_encoder
        object.__setattr__(self, "prefix_encoder", encoder)
        if encoder is None:  # N(0, 1), as an nn.Embedding starts
            self.prefix_key = nn.Parameter(torch.randn(K, n, C, device=base.query.weight.device))
            self.prefix_value = nn.Parameter(torch.randn(K, n, C, device=base.query.weight.device))

    def prefix(self):
        """(K_prefix, V_prefix) of every task, (K, n, C) each."""
        if self.prefix_encoder is None:
            return self.prefix_key, self.prefix_value
        return self.prefix_encoder(self.layer)

    def forward(self, x, attn_mask=None, cache=None):
        if self.disabled:
            return self.base(x, attn_mask, cache)
        attn, n = self.base, self.prefix_length
        B, T, C = x.shape  # (B, T, C)
        q, k, v = attn.qkv(x)  # (B, nh, T, hs) each
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, S, hs): the cache keeps real keys and values only
        S = k.size(2)
        prefix_k, prefix_v = (attn.split_heads(select_tasks(p, self.task_ids, B).to(k.dtype)) for p in self.prefix())
        k = torch.cat([prefix_k, k], dim=2)  # (B, nh, n + S, hs)
        v = torch.cat([prefix_v, v], dim=2)  # (B, nh, n + S, hs)
        if attn_mask is None:  # causal, the T queries being the last T of the S real keys
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)[None, None]
        see_prefix = torch.ones(*attn_mask.shape[:-1], n, dtype=torch.bool, device=x.device)
        attn_mask = torch.cat([see_prefix, attn_mask], dim=-1)  # (B or 1, 1, T, n + S): every query sees the prefix
        y = attn.attend(q, k, v, attn_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return attn.resid_drop(attn.proj(y))


def apply(model: nn.Module, config: PrefixTuningConfig) -> None:
    """Wrap every block's attention; the prefixes (or P' and the MLP) are the only trainable tensors."""
    blocks = model.encoder.blocks
    for i, block in enumerate(blocks):
        if isinstance(block.attn, AdapterLayer) or not hasattr(block.attn, "qkv"):
            raise ValueError(f"block {i}'s attention is already patched; call peft.unload(model) first")
    encoder = None
    if config.prefix_projection:
        device = model.input_layer.wte.weight.device
        encoder = PrefixEncoder(config, len(blocks), model.config.n_embd, device=device)
        model.prefix_encoder = encoder
    for i, block in enumerate(blocks):
        block.attn = PrefixAttention(block.attn, config, i, encoder)


def unload(model: nn.Module) -> None:
    """Put the original attention modules back and drop the prefix encoder."""
    for block in model.encoder.blocks:
        if isinstance(block.attn, PrefixAttention):
            block.attn = block.attn.base
    if hasattr(model, "prefix_encoder"):
        del model.prefix_encoder


def export(model: nn.Module) -> nn.Module:
    """Store the computed prefix P_theta = MLP(P') as per-layer parameters and drop P' and the MLP: identical
    outputs, n * n_layer * 2 * C numbers per task; ``model.peft_config`` gets prefix_projection=False."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"export needs a model patched with prefix tuning or p-tuning v2, got {type(config).__name__}")
    if not config.prefix_projection:
        return model  # already plain prefixes
    for block in model.encoder.blocks:
        layer = block.attn
        with torch.no_grad():
            k, v = layer.prefix()
        layer.prefix_key = nn.Parameter(k.detach().clone())
        layer.prefix_value = nn.Parameter(v.detach().clone())
        object.__setattr__(layer, "prefix_encoder", None)
    del model.prefix_encoder
    model.peft_config = dataclasses.replace(config, prefix_projection=False)
    return model
