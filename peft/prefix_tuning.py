"""Prefix-Tuning (Li & Liang 2021) and P-Tuning v2 (Liu et al. 2022): learned keys and values in every layer.

Prefix-Tuning prepends a prefix of n = num_virtual_tokens positions to every layer. Its activations are free
parameters P_theta rather than the output of the frozen model (Section 4.2):

    h_i = P_theta[i, :]            if i is a prefix position
    h_i = LM_phi(z_i, h_{<i})      otherwise

In a Transformer the only activations of the prefix that later tokens read are its keys and values, so each layer l
holds K_prefix^l, V_prefix^l (n, C) and attends over them in front of the real keys:

    head = softmax(q [K_prefix; K]^T / sqrt(d_k)) [V_prefix; V]

where every real query sees every prefix position and the real part stays causal. P_theta holds n * n_layer * 2 * C
numbers.

Positions. By default the prefix takes no positions: real tokens keep 0..T-1 and the context does not shrink. Li &
Liang's code and huggingface peft put the prefix in the key-value cache in front of the input instead, so GPT-2 gives
the real tokens positions n..n+T-1 (the prefix "occupies" 0..n-1). ``shift_positions=True`` is that convention: the
real tokens get positions n..n+T-1 (the usable context becomes block_size - n). A prefix trained under one
convention computes something else under the other, so a prefix meant for huggingface peft is trained with it on
(``peft.save_hf_adapter`` refuses a prefix trained without it).

Reparameterisation (Section 4.3). Optimising P_theta directly is unstable, so the paper trains a smaller matrix
P'_theta (n, d') and a large MLP, P_theta[i, :] = MLP_theta(P'_theta[i, :]), with the MLP's output of width
n_layer * 2 * C cut into each layer's key and value. The MLP runs once per forward pass of the model, for all layers
at once: hooks on ``model.encoder`` open a cache when the pass starts and close it when it ends, and every layer
reads its key and value from that one output. After training only P_theta is kept: ``export(model)`` stores the
computed prefix as plain per-layer parameters and drops P' and the MLP, with identical outputs.

P-Tuning v2 ("deep prompt tuning") is the same mechanism with continuous prompts in every layer and, by default, no
reparameterisation; ``PTuningV2Config`` only changes that default. With num_tasks = K every prefix is (K, n, C) and
each row picks its task with ``peft.task_ids`` (see prompt_tuning).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from minigpt.options import option

from .base import AdapterLayer, Float32Adapter
from .prompt_tuning import check_int, select_tasks


@dataclass
class PrefixTuningConfig:
    """num_virtual_tokens: the prefix length n. prefix_projection: train through P' and an MLP (Section 4.3).
    prefix_dim: d', the width of P' (None: n_embd, as in the authors' code). encoder_hidden_size: the MLP's hidden
    width (None: n_embd; the paper used 512 and 800). num_tasks: prefixes held for mixed-task batches.
    shift_positions: real tokens at positions n..n+T-1 behind the prefix, as in huggingface peft and Li & Liang's
    code (default: the prefix takes no positions)."""

    method = "prefix_tuning"
    num_virtual_tokens: int = option(20, "prompt methods: the number n of virtual tokens")
    prefix_projection: bool = option(True, "prefix-tuning: train the prefix through P' and an MLP (p-tuning v2: "
                                     "off by default)")
    prefix_dim: int | None = option(None, "prefix-tuning: the width d' of P' (none: n_embd)")
    encoder_hidden_size: int | None = option(None, "p-tuning, prefix-tuning: the encoder's hidden width "
                                             "(none: n_embd)")
    num_tasks: int = option(1, "prompt methods: prompts held for mixed-task batches")
    shift_positions: bool = option(False, "prefix-tuning: real tokens at positions n..n+T-1 behind the prefix "
                                   "(huggingface peft's convention)")

    def __post_init__(self):
        name = type(self).__name__
        check_int(name, "num_virtual_tokens", self.num_virtual_tokens)
        check_int(name, "num_tasks", self.num_tasks)
        for field in ("prefix_projection", "shift_positions"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{name}.{field} must be True or False, got {getattr(self, field)!r}")
        for field in ("prefix_dim", "encoder_hidden_size"):
            if getattr(self, field) is not None:
                check_int(name, field, getattr(self, field))


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-Tuning v2: deep prompts in every layer, trained directly (no reparameterisation) unless asked."""

    method = "p_tuning_v2"
    prefix_projection: bool = option(False, "prefix-tuning: train the prefix through P' and an MLP")


class PrefixEncoder(Float32Adapter, nn.Module):
    """P_theta = MLP_theta(P'_theta): P' (K, n, d') -> Linear -> tanh -> Linear -> (K, n, n_layer * 2 * C).

    ``start_pass`` and ``end_pass`` are hooks on the model's encoder: between them the MLP's output is computed at the
    first layer's request and shared by all layers (one MLP pass per forward pass). Outside a pass (a layer called on
    its own, ``export``) each call computes it afresh."""

    peft_module = True  # its parameters are the method's (peft.save_adapter), though it is no AdapterLayer

    def __init__(self, config: PrefixTuningConfig, n_layer: int, n_embd: int, device=None):
        super().__init__()
        K, n, C = config.num_tasks, config.num_virtual_tokens, n_embd
        d, H = config.prefix_dim or n_embd, config.encoder_hidden_size or n_embd
        self.n_layer, self.n_embd = n_layer, C
        self.embedding = nn.Parameter(torch.randn(K, n, d, device=device))  # P'
        self.mlp = nn.Sequential(
            nn.Linear(d, H, device=device), nn.Tanh(), nn.Linear(H, n_layer * 2 * C, device=device)
        )
        self.cache = None  # {} during a forward pass of the model; holds "kv" once computed

    def table(self) -> torch.Tensor:
        """The whole prefix P_theta of every task, (K, n, n_layer, 2, C): one pass of the MLP."""
        K, n = self.embedding.shape[:2]
        return self.mlp(self.embedding).view(K, n, self.n_layer, 2, self.n_embd)  # laid out (layer, key/value, C)

    def forward(self, layer: int):
        """Layer l's key and value prefixes, (K, n, C) each."""
        if self.cache is None:
            kv = self.table()
        else:
            if "kv" not in self.cache:
                self.cache["kv"] = self.table()
            kv = self.cache["kv"]
        return kv[:, :, layer, 0], kv[:, :, layer, 1]

    def start_pass(self, module, args):  # a forward pre-hook on model.encoder
        self.cache = {}

    def end_pass(self, module, args, output):  # a forward hook on model.encoder (always called, errors included)
        self.cache = None


class ShiftedPositions(AdapterLayer):
    """The input layer with every real token's position moved n on (``shift_positions``): position_ids + n, so the
    prefix occupies positions 0..n-1 as in huggingface peft. The usable context is block_size - n tokens."""

    def __init__(self, base: nn.Module, n: int, block_size: int):
        super().__init__(base)
        self.prefix_length, self.block_size = n, block_size

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the prefix occupies now (0 while disabled); generation keeps its window that much shorter."""
        return 0 if self.disabled else self.prefix_length

    def forward(self, idx, position_ids, inputs_embeds=None, past_length=0):
        if self.disabled:
            return self.base(idx, position_ids, inputs_embeds=inputs_embeds, past_length=past_length)
        n, T = self.prefix_length, position_ids.size(1)
        if past_length + T + n > self.block_size:
            raise ValueError(
                f"input of {past_length + T} tokens is too long: with shift_positions the prefix occupies positions "
                f"0..{n - 1}, leaving block_size - num_virtual_tokens = {self.block_size - n} for the input"
            )
        return self.base(idx, position_ids + n, inputs_embeds=inputs_embeds, past_length=past_length)


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
    """Wrap every block's attention (and with shift_positions the input layer); the prefixes (or P' and the MLP)
    are the only trainable tensors."""
    blocks = model.encoder.blocks
    for i, block in enumerate(blocks):
        if isinstance(block.attn, AdapterLayer) or not hasattr(block.attn, "qkv"):
            raise ValueError(f"block {i}'s attention is already patched; call peft.unload(model) first")
    n = config.num_virtual_tokens
    if config.shift_positions:
        if isinstance(model.input_layer, AdapterLayer):
            raise ValueError("the model's input layer is already patched; call peft.unload(model) first")
        if n >= model.config.block_size:
            raise ValueError(f"{type(config).__name__}.num_virtual_tokens ({n}) must be smaller than the model's "
                             f"block_size ({model.config.block_size}) with shift_positions")
    encoder = None
    if config.prefix_projection:
        device = model.input_layer.wte.weight.device
        encoder = PrefixEncoder(config, len(blocks), model.config.n_embd, device=device)
        model.prefix_encoder = encoder
        model.encoder.register_forward_pre_hook(encoder.start_pass)
        model.encoder.register_forward_hook(encoder.end_pass, always_call=True)
    for i, block in enumerate(blocks):
        block.attn = PrefixAttention(block.attn, config, i, encoder)
    if config.shift_positions:
        model.input_layer = ShiftedPositions(model.input_layer, n, model.config.block_size)


def _drop_encoder(model: nn.Module) -> None:
    """Remove the prefix encoder and its two hooks on model.encoder (found by owner: a deep copy of the model has
    its own hooks, bound to its own encoder)."""
    encoder = getattr(model, "prefix_encoder", None)
    if encoder is None:
        return
    enc = model.encoder
    for hooks in (enc._forward_pre_hooks, enc._forward_hooks):
        for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is encoder]:
            del hooks[key]
            enc._forward_hooks_always_called.pop(key, None)
    del model.prefix_encoder


def unload(model: nn.Module) -> None:
    """Drop the prefix encoder; peft.unload then puts the original attention (and input) modules back."""
    _drop_encoder(model)


def export(model: nn.Module) -> nn.Module:
    """Store the computed prefix P_theta = MLP(P') as per-layer parameters and drop P' and the MLP: identical
    outputs, n * n_layer * 2 * C numbers per task; ``model.peft_config`` gets prefix_projection=False."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"export needs a model patched with prefix tuning or p-tuning v2, got {type(config).__name__}")
    if not config.prefix_projection:
        return model  # already plain prefixes
    with torch.no_grad():
        table = model.prefix_encoder.table()  # (K, n, n_layer, 2, C)
    for i, block in enumerate(model.encoder.blocks):
        layer = block.attn
        layer.prefix_key = nn.Parameter(table[:, :, i, 0].clone())
        layer.prefix_value = nn.Parameter(table[:, :, i, 1].clone())
        object.__setattr__(layer, "prefix_encoder", None)
    _drop_encoder(model)
    model.peft_config = dataclasses.replace(config, prefix_projection=False)
    return model
