"""A GPT written out in the three parts the GPT papers describe (Radford et al. 2018, 2019).

    h_0 = U W_e + W_p                      input layer: token + learned position embeddings
    h_l = transformer_block(h_{l-1})       encoder: n_layer blocks, l = 1..n
    P(u) = softmax(LN(h_n) W_e^T)          output layer: final LayerNorm + head tied to W_e

Each block is causal multi-head self-attention and an MLP, each with a residual connection. GPT-2 puts the
LayerNorm before each sub-layer ("pre_ln", the default); the original Transformer and BERT put it after each
residual sum ("post_ln"), the layout whose equations the BitFit paper writes out.

This file holds the model only: PEFT methods patch its modules from outside (see ``peft/``), and RLHF wraps it.
Two small conventions let them do so without method code here:
- a patched input layer may prepend virtual tokens (prompt tuning); ``GPT.forward`` notices the extra positions,
  lets real tokens attend to them, and returns logits for the real tokens only; ``generate`` reads how many from
  the layer's ``num_virtual_tokens`` (default 0) to keep its sliding window within block_size;
- an attention mask always covers the real (cached + new) tokens; a patched attention that prepends its own keys
  (prefix-tuning) widens the mask itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import engine, pretrained
from .config import GPTConfig

# ----------------------------------------------------------------------------------------------------------
# Input layer


class InputLayer(nn.Module):
    """h_0 = W_e[u] + W_p[position], then dropout (GPT-2: learned absolute positions)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # W_e: token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # W_p: position embeddings
        self.drop = nn.Dropout(config.dropout)

    def forward(self, idx, position_ids, inputs_embeds=None, past_length=0):
        # idx, position_ids: (B, T); inputs_embeds (B, T, C) replaces W_e[idx] when given.
        # past_length is the number of cached positions (0 on the first step); this layer ignores it, a patched
        # layer that prepends virtual tokens uses it to do so only once.
        tok = self.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        return self.drop(tok + self.wpe(position_ids))  # (B, T, C)


# ----------------------------------------------------------------------------------------------------------
# Encoder: the Transformer block


class CausalSelfAttention(nn.Module):
    """Multi-head attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + causal mask) V (Vaswani et al. 2017, eq. 1).

    The query, key and value projections are separate Linear layers (GPT-2 fuses them into one ``c_attn``;
    separate ones let LoRA, IA3 and BitFit name exactly the projection they act on).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.query = nn.Linear(C, C, bias=config.bias)
        self.key = nn.Linear(C, C, bias=config.bias)
        self.value = nn.Linear(C, C, bias=config.bias)
        self.proj = nn.Linear(C, C, bias=config.bias)  # output projection W_O
        self.attn_dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def split_heads(self, x):
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

    def qkv(self, x):
        """The projected queries, keys and values, split into heads: three (B, nh, T, hs) tensors."""
        return self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))

    def attend(self, q, k, v, attn_mask=None):
        """softmax(q k^T / sqrt(hs) + mask) v with SDPA. q: (B, nh, T, hs); k, v: (B, nh, S, hs), S >= T.

        attn_mask: None means plain causal attention with the T queries being the last T of the S keys;
        otherwise a bool tensor broadcastable to (B, nh, T, S), True where a query may attend.
        """
        T, S = q.size(-2), k.size(-2)
        is_causal = False
        if attn_mask is None and T == S:
            is_causal = True
        elif attn_mask is None and T > 1:  # queries at the end of a longer key sequence (chunked decoding)
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        dropout_p = self.attn_dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.shape  # (B, T, C)
        q, k, v = self.qkv(x)  # (B, nh, T, hs) each
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, S, hs): the cached keys and values, then these
        y = self.attend(q, k, v, attn_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """FFN(x) = W_2 GELU(W_1 x + b_1) + b_2 with a 4x wider inner layer. GELU(z) = z Phi(z) (Hendrycks and Gimpel
    2016): GPT-2's tanh approximation 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) when config.activation is
    "gelu_tanh", the exact 0.5 z (1 + erf(z / sqrt 2)) when it is "gelu" (cheaper on CPUs, see the README)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One Transformer block.

    pre_ln (GPT-2):   x = x + attn(LN_1(x));   x = x + mlp(LN_2(x))
    post_ln (BERT):   x = LN_1(x + attn(x));   x = LN_2(x + mlp(x))
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.pre_ln = config.layout == "pre_ln"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None):
        if self.pre_ln:
            x = x + self.attn(self.ln_1(x), attn_mask, cache)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, attn_mask, cache))
        return self.ln_2(x + self.mlp(x))


class Encoder(nn.Module):
    """n_layer Transformer blocks applied in turn."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])

    def forward(self, x, attn_mask=None, cache=None):
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if cache is None else cache.layers[i])
        return x


# ----------------------------------------------------------------------------------------------------------
# Output layer


class OutputLayer(nn.Module):
    """logits = LN_f(h_n) W_e^T: the final LayerNorm (GPT-2) and a head whose weight is the token embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, x):
        return self.head(self.ln_f(x))  # (B, T, C) -> (B, T, vocab)


# ----------------------------------------------------------------------------------------------------------
# The GPT


def disable_dropout(model: nn.Module) -> None:
    """p = 0 in every nn.Dropout, in the attention's dropout (CausalSelfAttention keeps it as a float) and between
    the layers of a recurrent module (P-Tuning's LSTM prompt encoder). The reward model and PPO need it: a score or a
    log-probability must be the same function each time it is computed."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, CausalSelfAttention):
            m.attn_dropout = 0.0
        if isinstance(m, nn.RNNBase):
            m.dropout = 0.0


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.input_layer = InputLayer(config)
        self.encoder = Encoder(config)
        self.output_layer = OutputLayer(config)
        self.output_layer.head.weight = self.input_layer.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: "scale the weights of residual layers at initialization by 1/sqrt(N)", N = 2 residuals per block
        for block in self.encoder.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "GPT":
        """Load a Hugging Face-format GPT-2 directory (config.json + model.safetensors or pytorch_model.bin).
        overrides: GPTConfig fields such as dropout."""
        config, state_dict = pretrained.read_gpt2(path, **overrides)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, assign=True)
        model.output_layer.head.weight = model.input_layer.wte.weight  # assign=True replaced the tied parameter
        return model

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer whose ids do not all fit in this model's vocabulary."""
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{self.config.vocab_size}; build the model with vocab_size >= {tokenizer.vocab_size}"
            )

    # -- forward ---------------------------------------------------------------------------------------------

    def _check_input(self, idx, inputs_embeds, past_length):
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (B, T) token ids or inputs_embeds (B, T, C)")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.size(-1) != self.config.n_embd:
                raise ValueError(
                    f"inputs_embeds must have shape (B, T, {self.config.n_embd}), got {tuple(inputs_embeds.shape)}"
                )
            B, T = inputs_embeds.shape[:2]
        else:
            if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.long, torch.int32, torch.int16):
                raise TypeError(f"idx must be an integer tensor (torch.long), got {getattr(idx, 'dtype', type(idx))}")
            if idx.dim() != 2:
                raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)} ({idx.dim()} dimensions)")
            B, T = idx.shape
            if idx.numel() > 0 and not torch.compiler.is_compiling():  # a compiled graph cannot read values
                lo, hi = (int(v) for v in torch.aminmax(idx))
                if lo < 0 or hi >= self.config.vocab_size:
                    bad = hi if hi >= self.config.vocab_size else lo
                    raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if T == 0:
            raise ValueError("the input sequence is empty (T = 0)")
        if past_length + T > self.config.block_size:
            raise ValueError(
                f"sequence length {past_length + T} (cached {past_length} + new {T}) exceeds the model's "
                f"block_size {self.config.block_size}"
            )
        return B, T

    @staticmethod
    def _position_ids(mask, cache, B, T, device):
        """Position of each new token among the real tokens of its row, so left padding takes no position."""
        start = 0 if cache is None else cache.n_seen  # real tokens seen: an int, or (B,) once the rows differ
        if mask is None and not torch.is_tensor(start):
            return torch.arange(start, start + T, device=device).expand(B, T)  # (B, T)
        if torch.is_tensor(start):
            start = start[:, None]  # (B, 1)
        if mask is None:
            return start + torch.arange(T, device=device)  # (B, T)
        return start + (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    @staticmethod
    def _attention_mask(key_mask, T):
        """(B, 1, T, S) bool: query i (the i-th of the last T positions) sees real keys up to its own position."""
        B, S = key_mask.shape
        # a padding query would see no key at all (SDPA would return NaN there): let every query see itself
        if T == 1:  # one new token (a decoding step): it sees every real key, and itself
            mask = key_mask[:, None, None, :].clone()  # (B, 1, 1, S)
            mask[..., -1] = True
            return mask
        causal = torch.ones(T, S, dtype=torch.bool, device=key_mask.device).tril(diagonal=S - T)  # (T, S)
        mask = causal & key_mask[:, None, None, :]  # (B, 1, T, S)
        itself = torch.ones(T, S, dtype=torch.bool, device=key_mask.device).tril(S - T).triu(S - T)  # (T, S)
        return mask | itself

    def hidden_states(self, idx=None, *, inputs_embeds=None, attention_mask=None, cache=None):
        """The encoder's output h_n (B, T, C) for the real tokens: input layer -> blocks, before the output layer.
        The reward model and PPO's value head read these (through the final LayerNorm) instead of the logits.

        idx: (B, T) token ids, or inputs_embeds: (B, T, C).
        attention_mask: (B, T) with 1 for real tokens and 0 for padding (left padding for generation).
        cache: a KVCache to read past keys and values from and append these to (incremental decoding).
        """
        past = len(cache) if cache is not None else 0
        B, T = self._check_input(idx, inputs_embeds, past)
        device = idx.device if idx is not None else inputs_embeds.device
        mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        if mask is not None and mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)}, got {tuple(mask.shape)}")

        position_ids = self._position_ids(mask, cache, B, T, device)  # (B, T)
        x = self.input_layer(idx, position_ids, inputs_embeds=inputs_embeds, past_length=past)  # (B, T', C)
        n_virtual = x.size(1) - T  # > 0 when a patched input layer prepended virtual tokens
        if cache is not None:  # remember which cached positions are real, and how many tokens each row has seen
            mask = cache.append(mask, B, T, n_virtual, device)  # (B, S) over every cached position, or None
        elif n_virtual and mask is not None:  # virtual tokens are real keys
            mask = torch.cat([torch.ones(B, n_virtual, dtype=torch.bool, device=device), mask], dim=1)  # (B, T')
        # without padding, None selects SDPA's causal fast path (CausalSelfAttention.attend)
        attn_mask = None if mask is None else self._attention_mask(mask, x.size(1))

        x = self.encoder(x, attn_mask, cache)  # (B, T', C)
        return x[:, n_virtual:] if n_virtual else x  # the real tokens only: (B, T, C)

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, attention_mask=None, cache=None):
        """Logits for every position, and the mean cross-entropy over targets != -100 when targets are given.

        Arguments as for hidden_states. Returns (logits (B, T, vocab), loss or None).
        """
        h = self.hidden_states(idx, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache)
        logits = self.output_layer(h)  # (B, T, vocab)
        B, T = logits.shape[:2]
        loss = None
        if targets is not None:
            if targets.shape != (B, T):
                raise ValueError(f"targets must have shape {(B, T)}, got {tuple(targets.shape)}")
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -- generation ------------------------------------------------------------------------------------------

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 pad_token_id=None, attention_mask=None, generator=None, seed=None, use_cache=True):
        """Append up to max_new_tokens sampled tokens to idx (B, T) and return the (B, T + n) result.

        temperature 0 is greedy decoding. A row stops at its first eos_token_id; later positions of that row are
        filled with pad_token_id (or eos_token_id). A left-padded batch needs its attention_mask (B, T).
        With use_cache the KV cache makes each step cost one position; once the sequence reaches block_size the
        loop continues without the cache on the last block_size tokens (a sliding window, as nanoGPT does).
        Runs in evaluation mode (no dropout) and restores the model's mode. The loop is minigpt.engine's.
        """
        return engine.generate(self, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id,
                               attention_mask, generator, seed, use_cache)
