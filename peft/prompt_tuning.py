"""Prompt Tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

The whole model is frozen. A soft prompt P_e of n = num_virtual_tokens learned embeddings is prepended to the
embedded input X_e, and only P_e is trained to maximise the likelihood of the target (Section 2):

    [P_e; X_e] in R^{(n + T) x C},        Y = argmax_Y Pr_{theta; theta_P}(Y | [P; X])

Positions. The concatenation is what the model reads, so (as Hugging Face peft does on GPT-2) the virtual tokens take
positions 0..n-1 and get W_p[0..n-1] added, and every real token moves n positions on: position_ids + n, at every
step, cached decoding included. The usable context therefore shrinks to block_size - n tokens.

    h_0 = [P_e + W_p[0..n-1];  W_e[x] + W_p[n..n+T-1]]        then the blocks as usual; logits for x only

Mixed-task batches (Figure 2: one frozen model serves a batch whose rows belong to different tasks). With
``num_tasks = K`` the prompt is a (K, n, C) tensor and each row picks its own prompt:

    model = peft.get_peft_model(gpt, PromptTuningConfig(num_virtual_tokens=20, num_tasks=3))
    with peft.task_ids(model, [2, 0, 1]):      # row 0 uses task 2's prompt, row 1 task 0's, row 2 task 1's
        logits, _ = model(idx)                  # also model.generate(...)

``task_ids`` works the same way for P-Tuning, Prefix-Tuning and P-Tuning v2. With num_tasks = 1 no ids are needed.
The wrapper here (``PromptInput``) is shared with P-Tuning, which only changes where the prompt comes from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from minigpt.options import option

from .base import AdapterLayer

INITS = ("random", "vocab", "text")


def check_int(owner: str, name: str, value, minimum: int = 1) -> None:
    """A config field that must be an integer >= minimum (bool is refused: True is not a count)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class PromptTuningConfig:
    """num_virtual_tokens: the prompt length n. prompt_tuning_init: how P_e starts (Sections 2.1, 3.2):
    "random" (uniform in [-0.5, 0.5], the paper's random-uniform ablation), "vocab" (embeddings of tokens sampled
    uniformly from the whole vocabulary; the paper drew from the 5,000 most common) or "text" (the embeddings of
    prompt_tuning_init_token_ids, e.g. tokenizer.encode("Classify the review:") or the class labels, repeated or
    truncated to n). num_tasks: how many task prompts the model holds, for mixed-task batches."""

    method = "prompt_tuning"
    num_virtual_tokens: int = option(20, "prompt methods: the number n of virtual tokens")
    prompt_tuning_init: str = option("random", "prompt tuning: how the prompt starts (random, vocab, text)")
    prompt_tuning_init_token_ids: list[int] | None = option(None, "prompt tuning: token ids for init 'text'")
    num_tasks: int = option(1, "prompt methods: prompts held for mixed-task batches")

    def __post_init__(self):
        check_int("PromptTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        check_int("PromptTuningConfig", "num_tasks", self.num_tasks)
        if self.prompt_tuning_init not in INITS:
            raise ValueError(
                f"PromptTuningConfig.prompt_tuning_init must be one of {INITS}, got {self.prompt_tuning_init!r}"
            )
        ids = self.prompt_tuning_init_token_ids
        if self.prompt_tuning_init == "text":
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError(
                    "prompt_tuning_init='text' needs prompt_tuning_init_token_ids, a non-empty list of token ids "
                    f"(e.g. tokenizer.encode(text)), got {ids!r}"
                )
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"prompt_tuning_init_token_ids must hold token ids (integers >= 0), got {ids!r}")
            self.prompt_tuning_init_token_ids = list(ids)  # a list survives a JSON round trip unchanged
        elif ids is not None:
            raise ValueError(
                f"prompt_tuning_init_token_ids is only used with prompt_tuning_init='text', "
                f"not {self.prompt_tuning_init!r}"
            )


# -- choosing each row's task --------------------------------------------------------------------------------


def select_tasks(per_task: torch.Tensor, task_ids, batch_size: int) -> torch.Tensor:
    """Row b of the result is per_task[task_ids[b]]: (K, ...) -> (B, ...). Without task ids K must be 1."""
    K = per_task.size(0)
    if task_ids is None:
        if K != 1:
            raise ValueError(
                f"the adapter holds prompts for num_tasks={K} tasks; choose each row's task with "
                "`with peft.task_ids(model, ids): ...`"
            )
        return per_task.expand(batch_size, *per_task.shape[1:])
    if task_ids.numel() != batch_size:
        raise ValueError(f"task_ids has {task_ids.numel()} entries but the batch has {batch_size} rows")
    return per_task[task_ids.to(per_task.device)]


@contextlib.contextmanager
def task_ids(model: nn.Module, ids):
    """Within the block, row b of every batch uses the prompt (or prefix) of task ids[b], for all four prompt
    methods. ids: a sequence or 1-D integer tensor with one task id in [0, num_tasks) per row."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and hasattr(m, "task_ids")]
    if not layers:
        raise ValueError("task_ids needs a model patched with prompt tuning, p-tuning, prefix tuning or p-tuning v2")
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"task ids must be a 1-D sequence of integers (one per row), got {ids.tolist()!r}")
    num_tasks = layers[0].num_tasks
    bad = [int(i) for i in ids if not 0 <= int(i) < num_tasks]
    if bad:
        raise ValueError(f"task id {bad[0]} is outside [0, num_tasks={num_tasks})")
    previous = [layer.task_ids for layer in layers]
    for layer in layers:
        layer.task_ids = ids.long()
    try:
        yield model
    finally:
        for layer, before in zip(layers, previous):
            layer.task_ids = before


# -- the patched input layer -----------------------------------------------------------------------------------


class PromptEmbedding(nn.Module):
    """P_e itself: a (num_tasks, n, C) parameter. Calling it returns the prompts of every task."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (K, n, C)

    def forward(self):
        return self.weight  # (K, n, C)


class PromptInput(AdapterLayer):
    """The GPT's input layer with n virtual tokens in front: h_0 = [P_e + W_p[0..n-1]; W_e[x] + W_p[n + pos]].

    ``prompt`` is a module whose call returns the (K, n, C) prompts: a ``PromptEmbedding`` here, P-Tuning's prompt
    encoder there. The virtual tokens are prepended on the first step only (past_length == 0); cached steps find
    them in the KV cache and only shift their positions.
    """

    def __init__(self, base: nn.Module, prompt: nn.Module, prompt_length: int, num_tasks: int, block_size: int):
        super().__init__(base)
        self.prompt = prompt
        self.prompt_length = prompt_length  # n
        self.num_tasks = num_tasks  # K
        self.block_size = block_size
        self.task_ids = None  # (B,) task of each row, set by ``task_ids``; None with a single task

    @property
    def num_virtual_tokens(self) -> int:
        """Positions this layer prepends now (0 while disabled); GPT.generate keeps its window that much shorter."""
        return 0 if self.disabled else self.prompt_length

    def forward(self, idx, position_ids, inputs_embeds=None, past_length=0):
        if self.disabled:
            return self.base(idx, position_ids, inputs_embeds=inputs_embeds, past_length=past_length)
        n, T = self.prompt_length, position_ids.size(1)
        if past_length == 0 and n + T > self.block_size:
            raise ValueError(
                f"input of {T} tokens is too long: with num_virtual_tokens={n} virtual tokens in front, the usable "
                f"context is block_size - num_virtual_tokens = {self.block_size - n} tokens"
            )
        x = self.base(idx, position_ids + n, inputs_embeds=inputs_embeds, past_length=past_length)  # (B, T, C)
        if past_length > 0:  # the virtual tokens are already in the cache
            return x
        prompt = select_tasks(self.prompt(), self.task_ids, x.size(0)).to(x.dtype)  # (B, n, C)
        positions = torch.arange(n, device=x.device)  # the virtual tokens take positions 0..n-1
        virtual = self.base.drop(prompt + self.base.wpe(positions))  # (B, n, C)
        return torch.cat([virtual, x], dim=1)  # (B, n + T, C)


def check_prompt_fits(model: nn.Module, n: int, owner: str) -> None:
    if n >= model.config.block_size:
        raise ValueError(
            f"{owner}.num_virtual_tokens ({n}) must be smaller than the model's block_size "
            f"({model.config.block_size}): the virtual tokens take positions, leaving block_size - n for the input"
        )
    if isinstance(model.input_layer, AdapterLayer):
        raise ValueError("the model's input layer is already patched; call peft.unload(model) first")


def initial_prompt(wte: nn.Embedding, config: PromptTuningConfig) -> torch.Tensor:
    """P_e at the start of training, (K, n, C) in float32, by config.prompt_tuning_init."""
    K, n, C = config.num_tasks, config.num_virtual_tokens, wte.embedding_dim
    device = wte.weight.device
    if config.prompt_tuning_init == "random":
        return torch.empty(K, n, C, device=device).uniform_(-0.5, 0.5)
    if config.prompt_tuning_init == "vocab":
        ids = torch.randint(0, wte.num_embeddings, (K, n), device=device)
    else:
        text = config.prompt_tuning_init_token_ids
        too_big = [i for i in text if i >= wte.num_embeddings]
        if too_big:
            raise ValueError(
                f"prompt_tuning_init_token_ids holds token id {too_big[0]}, outside the vocabulary "
                f"[0, {wte.num_embeddings})"
            )
        repeated = (text * (n // len(text) + 1))[:n]  # repeat a short text, truncate a long one
        ids = torch.tensor(repeated, device=device).expand(K, n)
    return wte.weight.detach()[ids].float().clone()  # (K, n, C)


def apply(model: nn.Module, config: PromptTuningConfig) -> None:
    """Wrap model.input_layer so that it prepends P_e; P_e is the only trainable tensor."""
    check_prompt_fits(model, config.num_virtual_tokens, "PromptTuningConfig")
    prompt = PromptEmbedding(initial_prompt(model.input_layer.wte, config))
    model.input_layer = PromptInput(
        model.input_layer, prompt, config.num_virtual_tokens, config.num_tasks, model.config.block_size
    )
