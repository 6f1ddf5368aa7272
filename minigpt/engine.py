"""The one generation engine: sampling, chat, SFT evaluation, reward normalisation and RL rollouts all generate here.

    out = engine.complete(model, prompts, max_new_tokens=24, eos_token_id=eos, pad_token_id=pad, temperature=1.0)
    out.tokens          (B, P + R)  the prompts, padded on the left to a common length P, then the responses
    out.response_mask   (B, R)      1 for every response token up to and including the first eos, 0 after it
    out.logprobs        (B, R)      log pi(token) under the distribution it was sampled from (logprobs=True)
    out.responses()                 each row's response token ids, cut before its first eos

    for token in engine.stream(model, idx, max_new_tokens=100): ...     # one (B,) tensor of next tokens per step
    engine.generate(model, idx, max_new_tokens=50, temperature=0.8)    # = GPT.generate: (B, T + n) token ids

Decoding (Radford et al. 2019 sample this way): each step turns the last position's logits into a distribution,
softmax(logits / temperature), optionally restricted to the top_k most likely tokens or to the smallest set whose
probability reaches top_p (nucleus sampling, Holtzman et al. 2020), and draws the next token; temperature 0 takes the
argmax (greedy decoding). A row that has emitted eos is finished: later positions get pad_token_id.

The KV cache (one per block, filled in place) makes each step cost one position instead of the whole sequence: the
first step runs the prompt through the model and keeps every layer's keys and values; each later step runs only the
newest token and attends over the cached keys. Left padding puts every row's next token in the same column, so a
batch of prompts of different lengths decodes together; the attention mask keeps padding out of attention and
position ids count real tokens only. A padded batch's prompt step runs in a few groups of rows of similar length,
each padded only to its own longest prompt (prefill_in_groups), and fills the cache as one pass would. Rows that
have finished leave the cached batch once a quarter of it has (KVCache.keep_rows), so the steps after that compute
only the rows still decoding; the tokens are the same. When the context is full the loop goes on without the cache
over the last block_size tokens (a sliding window, as nanoGPT does).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------------------
# The KV cache


class LayerCache:
    """The keys and values one attention layer has seen so far, in a buffer allocated once and filled in place
    (a torch.cat per step would copy the whole history every step). update returns views of the filled part."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity  # positions to allocate at the first update (grows by doubling if exceeded)
        self.k = self.v = None
        self.length = 0

    def update(self, k, v):
        B, nh, T, hs = k.shape  # (B, nh, T, hs)
        if self.k is None or self.length + T > self.k.size(2):
            size = max(self.capacity, 2 * (self.length + T))
            grown_k, grown_v = k.new_empty(B, nh, size, hs), v.new_empty(B, nh, size, hs)
            if self.k is not None:
                grown_k[:, :, : self.length] = self.k[:, :, : self.length]
                grown_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]  # (B, nh, S, hs)

    def put(self, rows, start: int, k, v, batch: int, length: int):
        """Write the keys and values k, v (b, nh, t, hs) of some rows at positions start..start + t of a cache of
        `batch` rows filled to `length` positions (a prefill done in groups of rows). The positions before start
        are the rows' padding: set to 0, never attended to (the key mask), but finite."""
        if self.k is None:
            _, nh, _, hs = k.shape
            size = max(self.capacity, 2 * length)
            self.k, self.v = k.new_empty(batch, nh, size, hs), v.new_empty(batch, nh, size, hs)
        self.k[rows, :, :start] = 0
        self.v[rows, :, :start] = 0
        self.k[rows, :, start : start + k.size(2)] = k
        self.v[rows, :, start : start + v.size(2)] = v
        self.length = length


class KVCache:
    """A LayerCache per block, plus which cached positions are real tokens and how many each row has seen.

    key_mask (B, S): True for a real token, False for padding (and True for virtual tokens of a prompt method),
        a view of a buffer allocated once, like the keys and values.
    n_seen: real tokens seen per row, the next token's position id: an int while every row has seen as many,
        a (B,) tensor once a mask made them differ.
    padded: whether a mask was ever given (then attention needs an explicit mask).
    capacity: positions each layer allocates up front (the engine passes block_size).
    """

    def __init__(self, n_layer: int, capacity: int = 0):
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]
        self.capacity = capacity
        self.length = 0  # cached positions, virtual tokens included
        self._key_mask = None  # (B, capacity) bool, True where not yet written
        self.n_seen = 0
        self.padded = False

    def __len__(self):
        return self.length

    @property
    def key_mask(self):
        return None if self._key_mask is None else self._key_mask[:, : self.length]  # (B, S)

    def keep_rows(self, rows):
        """Keep only the cached rows at indices rows (b,), in that order: rows that finished decoding leave the
        batch, so that later steps compute only what the others need."""
        for layer in self.layers:
            if layer.k is not None:
                layer.k, layer.v = layer.k[rows], layer.v[rows]  # (b, nh, capacity, hs)
        if self._key_mask is not None:
            self._key_mask = self._key_mask[rows]
        if torch.is_tensor(self.n_seen):
            self.n_seen = self.n_seen[rows]

    def append(self, mask, B: int, T: int, n_virtual: int = 0, device=None):
        """Record n_virtual + T new positions: n_virtual virtual tokens (real keys, but not tokens seen), then T
        tokens whose mask (B, T) bool says which are real (None: all). Returns the key mask over every cached
        position, (B, S), or None while no mask was ever given."""
        n = n_virtual + T
        if self._key_mask is None or self.length + n > self._key_mask.size(1):
            grown = torch.ones(B, max(self.capacity, 2 * (self.length + n)), dtype=torch.bool, device=device)
            if self._key_mask is not None:
                grown[:, : self.length] = self._key_mask[:, : self.length]
            self._key_mask = grown
        if mask is not None:
            self._key_mask[:, self.length + n_virtual : self.length + n] = mask
            self.padded = True
        self.n_seen = self.n_seen + (T if mask is None else mask.sum(-1))  # an int + an int stays an int
        self.length += n
        return self.key_mask if self.padded else None


# ----------------------------------------------------------------------------------------------------------
# One token from the logits


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """Refuse sampling settings that mean nothing, naming the value (a NaN temperature would fail deep in torch)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy decoding), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p!r}")


def sampling_logits(logits, temperature: float = 1.0, top_k=None, top_p=None):
    """logits / temperature (float32) with every token outside the top_k / the top_p nucleus set to -inf: (B, V).
    Its softmax is the distribution a token is sampled from (temperature > 0)."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus is already full
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, V): greedy when temperature == 0, else a draw from
    softmax(sampling_logits(logits, temperature, top_k, top_p))."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# The decoding loop


def context_window(model) -> int:
    """Real tokens that fit in the model's context: block_size less the virtual tokens a prompt method prepends."""
    return model.config.block_size - getattr(model.input_layer, "num_virtual_tokens", 0)


def next_token_logits(model, idx, attention_mask=None, cache=None):
    """The logits of each row's next token, (B, V): the output layer on the last position only, the one a decoding
    step needs (on every position it would cost T times as much). Arguments as for GPT.hidden_states."""
    h = model.hidden_states(idx, attention_mask=attention_mask, cache=cache)  # (B, T, C)
    return model.output_layer(h[:, -1])  # (B, V)


PREFILL_GROUPS = 4  # groups of rows the first step of a padded batch runs in (engine.prefill_in_groups)
DROP_FINISHED = True  # rows that emitted eos leave the cached batch once a quarter of it has (see _steps)


def prefill_in_groups(model, ids, mask, cache, groups: int = PREFILL_GROUPS):
    """The first step over a left-padded batch of prompts, ids and mask (B, T), in `groups` passes over rows of
    similar length, each padded only to its own longest prompt (prompts of 8 to 40 tokens padded to 40 are about 40%
    padding). Leaves in cache what one pass over the whole batch would leave (the same keys and values at the same
    positions, the same key mask and token counts) and returns the same next-token logits (B, V)."""
    B, T = ids.shape
    lengths = mask.sum(-1)  # (B,) real tokens per row
    logits = None
    for rows in lengths.argsort().tensor_split(groups):  # rows of similar length together
        if rows.numel() == 0:
            continue
        M = max(1, int(lengths[rows].max()))  # the group's longest prompt: its last M columns hold every real token
        part = KVCache(len(cache.layers), M)
        out = next_token_logits(model, ids[rows, T - M :], mask[rows, T - M :], part)  # (b, V)
        if logits is None:
            logits = out.new_empty(B, out.size(-1))
        logits[rows] = out
        for layer, piece in zip(cache.layers, part.layers):
            layer.put(rows, T - M, piece.k[:, :, :M], piece.v[:, :, :M], B, T)
    cache.append(mask.bool(), B, T, device=mask.device)  # the prompt's positions (keys and values are already put)
    return logits


def _steps(model, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, fill_token_id, attention_mask,
           generator, use_cache):
    """Yield (next_token (B,), logits (B, V)) for each new position. idx (B, T) and attention_mask (B, T) or None."""
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = idx.shape
    device = idx.device
    seq = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=device)  # every token, written in place
    seq[:, :T] = idx
    padded = attention_mask is not None
    mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)  # new tokens are real
    if padded:
        mask[:, :T] = attention_mask.bool()
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    window = context_window(model)
    cache = KVCache(model.config.n_layer, model.config.block_size) if use_cache else None
    start = max(0, T - window)  # the first step reads at most `window` tokens: a longer prompt slides at once
    step_input, step_mask = seq[:, start:T], mask[:, start:T] if padded else None
    # a mixed-task batch of a prompt method (peft.task_ids): its layers pick each row's prompt by the row's place in
    # the batch, so the batch keeps all its rows in every pass (no grouped prefill, no dropped rows)
    whole_batch = any(getattr(m, "task_ids", None) is not None for m in model.modules())
    # a padded batch's first step runs in groups of rows of similar length (prefill_in_groups) when padding is at
    # least a tenth of it; not with a prompt method's virtual tokens, whose per-row prompts a group would need
    grouped = (cache is not None and padded and B >= 2 * PREFILL_GROUPS and window == model.config.block_size
               and not whole_batch and 10 * int((~step_mask).sum()) >= step_mask.numel())
    # once a quarter of the cached rows have emitted eos, the cache keeps only the others (KVCache.keep_rows):
    # `live` (b,) lists the batch rows it holds (None: all B). Their logits go back into a (B, V) tensor (zeros for
    # finished rows, whose tokens are the fill token anyway), so the sampled tokens are those of the whole batch
    live = None
    droppable = DROP_FINISHED and not whole_batch
    for t in range(T, T + max_new_tokens):
        if cache is not None and t - start > window:
            cache, live = None, None  # context full: slide the window over every row from now on
        if cache is None:
            lo = max(0, t - window)
            step_input, step_mask = seq[:, lo:t], mask[:, lo:t] if padded else None
        if grouped and t == T:
            logits = prefill_in_groups(model, step_input, step_mask, cache)  # (B, V)
        else:
            logits = next_token_logits(model, step_input, step_mask, cache)  # (b, V)
        if live is not None:
            logits = logits.new_zeros(B, logits.size(-1)).index_copy_(0, live, logits)  # (B, V)
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_token_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, fill_token_id), next_token)
            finished |= next_token == eos_token_id
        seq[:, t] = next_token
        yield next_token, logits
        if eos_token_id is not None:
            n_done = int(finished.sum())  # the step's one host sync
            if n_done == B:
                return
            cached = B if live is None else live.numel()
            last = t == T + max_new_tokens - 1
            if cache is not None and droppable and not last and 4 * (n_done - (B - cached)) >= cached:
                keep = (~finished if live is None else ~finished[live]).nonzero().squeeze(1)  # (b,) cached rows kept
                cache.keep_rows(keep)
                live = keep if live is None else live[keep]
        # the next step reads the new token of each cached row; the cache remembers the prompt's padding
        step_input, step_mask = (seq[:, t : t + 1] if live is None else seq[live, t : t + 1]), None


@contextlib.contextmanager
def inference(model):
    """Evaluation mode (no dropout) and no autograd for the duration; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
           pad_token_id=None, attention_mask=None, generator=None, use_cache=True):
    """Yield the next token of every row, (B,), one step at a time (for printing tokens as they come). Rows that
    have emitted eos_token_id get pad_token_id (or eos) afterwards; the loop ends when every row has."""
    fill = eos_token_id if pad_token_id is None else pad_token_id
    with inference(model):
        for token, _ in _steps(model, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, fill,
                               attention_mask, generator, use_cache):
            yield token


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
             pad_token_id=None, attention_mask=None, generator=None, seed=None, use_cache=True):
    """idx (B, T) with up to max_new_tokens sampled tokens appended: (B, T + n). See GPT.generate."""
    if generator is None and seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    tokens = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id,
                         attention_mask, generator, use_cache))
    return torch.cat([idx, torch.stack(tokens, dim=1)], dim=1) if tokens else idx


# ----------------------------------------------------------------------------------------------------------
# Batches of prompts


def left_pad(prompts: list[list[int]], pad_token_id: int):
    """Prompts padded on the left, so every row's next token goes in the same column: (ids (B, P), mask (B, P))."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(p)
        mask[b, P - len(p) :] = 1
    return ids, mask


@dataclass
class Generation:
    """Prompts and their sampled responses, as the RL methods read them."""

    tokens: torch.Tensor  # (B, P + R) left-padded prompts, then the responses (pad after a row's eos)
    attention_mask: torch.Tensor  # (B, P + R) 1 for every real prompt token and every response token up to eos
    prompt_len: int  # P
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first eos
    eos_token_id: int
    logprobs: torch.Tensor | None = None  # (B, R) log-probability of each response token where it was sampled

    @property
    def response(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len :]  # (B, R)

    @property
    def has_eos(self) -> torch.Tensor:
        """(B,) whether the row's response ended with eos (False: cut off at max_new_tokens)."""
        return ((self.response == self.eos_token_id) & self.response_mask.bool()).any(-1)

    def responses(self) -> list[list[int]]:
        """Each row's response token ids, cut before its first eos."""
        out = []
        for row, n, eos in zip(self.response.tolist(), self.response_mask.sum(-1).tolist(), self.has_eos.tolist()):
            out.append(row[: int(n) - 1] if eos else row[: int(n)])
        return out


def response_mask_of(response, eos_token_id: int):
    """(B, R) 1 for response tokens up to and including the first eos, 0 after it."""
    is_eos = (response == eos_token_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first eos
    return (~after_eos).long()


def complete(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int, pad_token_id: int,
             temperature: float = 0.0, top_k=None, top_p=None, generator=None, seed=None,
             logprobs: bool = False, truncate_prompts: bool = False) -> Generation:
    """Responses to a batch of prompts (token id lists), decoded together with the KV cache. A prompt and its
    response must fit in the context (the RL methods read both in one forward pass): a longer prompt is refused,
    naming the lengths, or with truncate_prompts cut from the left to fit."""
    window = context_window(model)
    if max_new_tokens >= window:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{window} tokens")
    if truncate_prompts:
        prompts = [p[-(window - max_new_tokens):] for p in prompts]
    longest = max(map(len, prompts)) if prompts else 0
    if longest + max_new_tokens > window:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context of {window} tokens; shorten the prompts or lower max_new_tokens")
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_token_id))
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    tokens, step_logprobs = [], []
    with inference(model):
        for token, step_logits in _steps(model, ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                         pad_token_id, mask, generator, True):
            tokens.append(token)
            if logprobs:
                dist = step_logits.float() if temperature == 0 else sampling_logits(step_logits, temperature, top_k,
                                                                                     top_p)
                step_logprobs.append(torch.log_softmax(dist, -1).gather(-1, token[:, None]).squeeze(-1))
    response = torch.stack(tokens, dim=1) if tokens else ids.new_zeros(len(prompts), 0)  # (B, R)
    rmask = response_mask_of(response, eos_token_id)
    lp = None
    if logprobs:
        lp = torch.stack(step_logprobs, dim=1) if step_logprobs else response.float()
        lp = torch.where(rmask.bool(), lp, 0.0)  # 0 after eos (a fill token outside top_k / top_p has -inf there)
    return Generation(torch.cat([ids, response], dim=1), torch.cat([mask, rmask], dim=1), ids.size(1), rmask,
                      eos_token_id, lp)


def complete_all(model, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                 batch_size: int = 64, **sampling) -> list[list[int]]:
    """The response token ids (cut before eos) to any number of prompts, batch_size prompts at a time."""
    responses = []
    for start in range(0, len(prompts), batch_size):
        responses += complete(model, prompts[start : start + batch_size], max_new_tokens, eos_token_id,
                              pad_token_id, **sampling).responses()
    return responses
