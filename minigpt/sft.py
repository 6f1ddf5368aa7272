"""Supervised fine-tuning (instruction tuning): language modelling on the answer tokens only.

An example {instruction, input, output} (the Alpaca layout) becomes

    prompt = "### Instruction:\\n{instruction}\\n### Input:\\n{input}\\n### Response:\\n"      (tasks.format_prompt)
    tokens = encode(prompt) + encode(output) + [eos]
    labels = [-100] * len(encode(prompt)) + encode(output) + [eos]

so the loss (cross-entropy over positions whose label is not -100) counts the answer and the end-of-text token that
teaches the model to stop, never the prompt. Batches are padded on the right with the tokenizer's pad token and
labels -100; right padding needs no attention mask in a causal model, since real tokens never look to their right.

Evaluation: the answer-token loss on held-out examples, and exact-match accuracy of greedy answers (prompts padded on
the left and decoded together with the KV cache, each stopped at its first eos).
"""

from __future__ import annotations

import torch

from .tasks import check_answer, format_prompt, read_jsonl  # noqa: F401  (read_jsonl: the Alpaca JSONL reader)


def encode_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(tokens, labels) of one example: labels are -100 on the prompt, the token ids on the answer and eos."""
    prompt = tokenizer.encode(format_prompt(example["instruction"], example.get("input", "")))
    answer = tokenizer.encode(example["output"]) + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def encode_dataset(tokenizer, examples: list[dict], block_size: int) -> list[tuple[list[int], list[int]]]:
    """Encoded examples whose tokens fit the context (block_size + 1 tokens: inputs and shifted targets).
    An example that does not fit raises an error naming it: silently dropping data hides problems."""
    encoded = []
    for i, ex in enumerate(examples):
        tokens, labels = encode_example(tokenizer, ex)
        if len(tokens) - 1 > block_size:
            raise ValueError(
                f"example {i} is {len(tokens)} tokens long but the model's context is {block_size} "
                f"(instruction {ex['instruction'][:40]!r}...); shorten it or use a model with a larger block_size"
            )
        encoded.append((tokens, labels))
    return encoded


def collate(encoded: list[tuple[list[int], list[int]]], pad_token_id: int):
    """Right-padded inputs x (B, T) and targets y (B, T): y[t] is the label of token t + 1, -100 on padding."""
    T = max(len(tokens) for tokens, _ in encoded) - 1
    x = torch.full((len(encoded), T), pad_token_id, dtype=torch.long)
    y = torch.full((len(encoded), T), -100, dtype=torch.long)
    for b, (tokens, labels) in enumerate(encoded):
        n = len(tokens) - 1
        x[b, :n] = torch.tensor(tokens[:-1])
        y[b, :n] = torch.tensor(labels[1:])
    return x, y


def random_batch(encoded, batch_size: int, pad_token_id: int, generator: torch.Generator):
    """batch_size examples drawn uniformly (with replacement) with the given generator."""
    ix = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
    return collate([encoded[i] for i in ix], pad_token_id)


def left_pad(prompts: list[list[int]], pad_token_id: int):
    """Prompts padded on the left, so every row's next token goes in the same column: (ids, attention_mask)."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[dict], max_new_tokens: int = 32, batch_size: int = 64,
                     temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """The model's answer to each example's prompt (greedy by default), cut at the first eos."""
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer.encode(format_prompt(ex["instruction"], ex.get("input", ""))) for ex in chunk]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        out = model.generate(ids.to(device), max_new_tokens, temperature=temperature, attention_mask=mask.to(device),
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=seed)
        for row in out[:, ids.size(1) :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row))
    return answers


@torch.no_grad()
def answer_loss(model, encoded, pad_token_id: int, batch_size: int = 64) -> float:
    """Mean cross-entropy over the answer tokens (and eos) of the encoded examples, in nats per token."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        x, y = collate(encoded[start : start + batch_size], pad_token_id)
        logits, _ = model(x.to(device))
        y = y.to(device)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                                   reduction="sum").item()
        count += int((y != -100).sum())
    return total / max(count, 1)


def evaluate(model, tokenizer, examples: list[dict], encoded=None, max_new_tokens: int = 32) -> dict:
    """{"answer_loss", "accuracy", "accuracy_by_task"} on held-out examples (accuracy: exact match of greedy
    answers; accuracy_by_task: the same per example["task"], for examples that name their task)."""
    if encoded is None:
        encoded = encode_dataset(tokenizer, examples, model.config.block_size)
    answers = generate_answers(model, tokenizer, examples, max_new_tokens)
    correct = [check_answer(ex, a) for ex, a in zip(examples, answers)]
    by_task = {}
    for ex, right in zip(examples, correct):
        if "task" in ex:
            by_task.setdefault(ex["task"], []).append(right)
    return {"answer_loss": answer_loss(model, encoded, tokenizer.pad_token_id), "accuracy": sum(correct) / len(correct),
            "accuracy_by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}}
