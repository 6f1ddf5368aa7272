"""Supervised fine-tuning (instruction tuning): language modelling on the answer tokens only, with all weights or
through a PEFT method (the methods themselves are in ``peft/``; this module takes a model with or without one).

An example {instruction, input, output} (the Alpaca layout) becomes

    prompt = "### Instruction:\\n{instruction}\\n### Input:\\n{input}\\n### Response:\\n"      (tasks.format_prompt)
    tokens = encode(prompt) + encode(output) + [eos]
    labels = [-100] * len(encode(prompt)) + encode(output) + [eos]

so the loss (cross-entropy over positions whose label is not -100) counts the answer and the end-of-text token that
teaches the model to stop, never the prompt. Batches are padded on the right with the tokenizer's pad token and
labels -100; right padding needs no attention mask in a causal model, since real tokens never look to their right,
and lets a batch be computed in passes over rows of similar length, each cut after its longest row (summed_loss).

Evaluation: the answer-token loss on held-out examples, and exact-match accuracy of greedy answers (decoded together
by the generation engine, minigpt.engine).

The stage: ``run_sft(SFTConfig(...), TrainConfig(...), peft_config)`` opens the base model, fine-tunes it through the
one training loop and writes a model folder (minigpt.checkpoint) that records the prompt template; its command line
is ``python -m peft.train``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, engine, tasks
from .data import by_length, labelled_lengths
from .device import select_device
from .files import read_jsonl
from .options import option
from .runs import claim
from .tasks import check_answer, format_prompt
from .train import TrainConfig, train

METHODS = ["full", "bitfit", "prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "lora", "ia3", "adapter"]
# learning rates that work on the built-in task (see benchmarks/bench_peft.py for the sweep): methods with few
# parameters far from the loss surface's sharp directions take larger steps; virtual tokens the largest
DEFAULT_LR = {"full": 1e-3, "bitfit": 1e-2, "lora": 1e-2, "ia3": 3e-2, "adapter": 1e-2, "prompt_tuning": 0.3,
              "p_tuning": 0.1, "prefix_tuning": 1e-2, "p_tuning_v2": 0.1}

# -- data ---------------------------------------------------------------------------------------------------------


def encode_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(tokens, labels) of one example: labels are -100 on the prompt, the token ids on the answer and eos."""
    prompt = tokenizer.encode(format_prompt(example["instruction"], example.get("input", "")))
    answer = tokenizer.encode(example["output"]) + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def encode_dataset(tokenizer, examples: list[dict], block_size: int) -> list[tuple[list[int], list[int]]]:
    """Encoded examples whose tokens fit the context (block_size + 1 tokens: inputs and shifted targets).
    An example that does not fit raises an error naming it: silently dropping data hides problems."""
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    too_long = [i for i, (tokens, _) in enumerate(encoded) if len(tokens) - 1 > block_size]
    if too_long:
        i, longest = too_long[0], max(len(tokens) - 1 for tokens, _ in encoded)
        raise ValueError(
            f"example {i} is {len(encoded[i][0])} tokens long but the model's context is {block_size} "
            f"(instruction {examples[i]['instruction'][:40]!r}...); these examples need a context of {longest} "
            f"tokens: fine-tune a model with block_size >= {longest} (pretrain with --block-size {longest} or more), "
            f"or shorten them")
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


# -- evaluation ---------------------------------------------------------------------------------------------------


def generate_answers(model, tokenizer, examples: list[dict], max_new_tokens: int = 32, batch_size: int = 64,
                     temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """The model's answer to each example's prompt (greedy by default), cut at the first eos."""
    prompts = [tokenizer.encode(format_prompt(ex["instruction"], ex.get("input", ""))) for ex in examples]
    room = engine.context_window(model) - max(map(len, prompts), default=0)  # an answer fits beside every prompt
    responses = engine.complete_all(model, prompts, max(1, min(max_new_tokens, room)), tokenizer.eos_token_id,
                                    tokenizer.pad_token_id, batch_size, temperature=temperature, seed=seed,
                                    truncate_prompts=True)
    return [tokenizer.decode(r) for r in responses]


def summed_loss(model, x, y):
    """(summed cross-entropy, number of labels) over the labelled positions (y != -100) of a right-padded batch x,
    y (B, T): the loss of model(x, y) times the count, in passes over rows of similar length, each cut after its
    longest row (data.by_length), so that less padding is computed."""

    def row_losses(x, y):  # (rows,)
        logits, _ = model(x)  # (rows, T, vocab)
        token_losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="none")
        return token_losses.view(y.shape).sum(-1)

    return by_length(row_losses, labelled_lengths(y), x, y).sum(), (y != -100).sum()


@torch.no_grad()
def answer_loss(model, encoded, pad_token_id: int, batch_size: int = 64) -> float:
    """Mean cross-entropy over the answer tokens (and eos) of the encoded examples, in nats per token."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        x, y = collate(encoded[start : start + batch_size], pad_token_id)
        summed, n = summed_loss(model, x.to(device), y.to(device))
        total, count = total + summed.item(), count + int(n)
    return total / max(count, 1)


def evaluate(model, tokenizer, examples: list[dict], encoded=None, max_new_tokens: int = 32) -> dict:
    """{"answer_loss", "accuracy", "accuracy_by_task"} on held-out examples (accuracy: exact match of greedy
    answers; accuracy_by_task: the same per example["task"], for examples that name their task)."""
    if encoded is None:
        encoded = encode_dataset(tokenizer, examples, engine.context_window(model))
    answers = generate_answers(model, tokenizer, examples, max_new_tokens)
    correct = [check_answer(ex, a) for ex, a in zip(examples, answers)]
    by_task = {}
    for ex, right in zip(examples, correct):
        if "task" in ex:
            by_task.setdefault(ex["task"], []).append(right)
    return {"answer_loss": answer_loss(model, encoded, tokenizer.pad_token_id), "accuracy": sum(correct) / len(correct),
            "accuracy_by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}}


# -- fine-tuning ----------------------------------------------------------------------------------------------------


def method_config(method: str, **values):
    """The PEFT config of method with the given field values (None: the config's default); None for "full".
    A name the method's config does not have is refused, naming the ones it has."""
    import peft

    if method == "full":
        given = [k for k, v in values.items() if v is not None]
        if given:
            raise ValueError(f"options {given} belong to PEFT methods; method 'full' trains all weights and has none")
        return None
    if method not in peft.CONFIGS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    cls = peft.CONFIGS[method]
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k, v in values.items() if v is not None and k not in names]
    if unknown:
        raise ValueError(f"{method} has no option {unknown[0]!r}; its options are {names}")
    return cls(**{k: v for k, v in values.items() if v is not None})


def finetune(model, tokenizer, train_examples, test_examples, config=None, cfg: TrainConfig | None = None,
             eval_examples: int = 200, meta: dict | None = None, resume: dict | None = None) -> dict:
    """Fine-tune model in place through the one training loop (patched with the PEFT config first, unless it is
    None) and return the final metrics. A model carrying a PEFT method trains only the method's tensors, and its
    checkpoints hold only those. meta: the model's description, written into every checkpoint; resume: a checkpoint
    of this fine-tuning to continue from."""
    import peft

    cfg = cfg or TrainConfig()
    if config is not None:
        peft.get_peft_model(model, config)
    if getattr(model, "peft_config", None) is not None:
        cfg = dataclasses.replace(cfg, save_trainable_only=True)
    model.check_tokenizer(tokenizer)
    window = engine.context_window(model)
    train_set = encode_dataset(tokenizer, train_examples, window)
    test_examples = test_examples[:eval_examples]
    test_set = encode_dataset(tokenizer, test_examples, window)
    pad = tokenizer.pad_token_id

    def get_batch(generator):
        return random_batch(train_set, cfg.batch_size, pad, generator)

    def loss_fn(m, batch):  # the mean over the batch's answer tokens, as m(x, y) computes it
        summed, n = summed_loss(m, *batch)
        return summed / n

    def evaluation(m):
        metrics = evaluate(m, tokenizer, test_examples, test_set)
        return {"val_loss": metrics["answer_loss"], "accuracy": metrics["accuracy"]}

    trainable, total = peft.count_parameters(model)
    method = "full" if getattr(model, "peft_config", None) is None else model.peft_config.method
    meta = meta or checkpoint.describe(model, "sft", tasks.TEMPLATE)
    rows = train(model, get_batch, loss_fn, cfg, evaluation, meta=dict(meta, tokenizer=tokenizer.to_dict()),
                 resume=resume)
    final = [r for r in rows if r.get("val_loss") is not None][-1]
    return {"method": method, "trainable_params": trainable, "total_params": total, "answer_loss": final["val_loss"],
            "accuracy": final["accuracy"], "train_s": final["elapsed_s"], "iters": final["iter"] + 1}


# -- the stage ------------------------------------------------------------------------------------------------------


@dataclass
class SFTConfig:
    """What to fine-tune, on what (the optimisation is a TrainConfig; the method's options a PEFT config)."""

    method: str = option("lora", "full (all weights) or a PEFT method", choices=METHODS)
    base: str = option("out/pretrain", "the model to fine-tune: a pretraining run or any model folder, a .pt "
                       "checkpoint, or a Hugging Face GPT-2 folder")
    train_file: str | None = option(None, "Alpaca-layout JSONL (instruction, optional input, output) to train on "
                                    "(default: the built-in instruction set)")
    test_file: str | None = option(None, "Alpaca-layout JSONL of held-out examples (default: the built-in held-out "
                                   "set; with --train-file, its last --eval-examples rows, left out of training)")
    eval_examples: int = option(200, "held-out examples scored at each evaluation")
    remark_share: float = option(0.0, "built-in data: share of training answers followed by a remark")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.eval_examples < 1:
            raise ValueError(f"eval_examples must be >= 1, got {self.eval_examples}")


def sft_data(scfg: SFTConfig) -> tuple[list[dict], list[dict], str]:
    """(training examples, held-out examples, where they came from)."""
    if not scfg.train_file:
        train_examples, test_examples = tasks.sft_examples(remark_share=scfg.remark_share)
        return train_examples, test_examples, "built-in instruction set"
    train_examples = read_jsonl(scfg.train_file)
    if scfg.test_file:
        return train_examples, read_jsonl(scfg.test_file), f"{scfg.train_file}, tested on {scfg.test_file}"
    n = scfg.eval_examples
    if len(train_examples) <= n:
        raise ValueError(f"{scfg.train_file} has {len(train_examples)} examples: too few to hold out "
                         f"--eval-examples {n} for testing; give --test-file or lower --eval-examples")
    return train_examples[:-n], train_examples[-n:], f"{scfg.train_file} (its last {n} rows held out)"


def open_base(path):
    """(loaded, merged): the model to fine-tune from path, with its tokenizer and description. A base that carries a
    mergeable adapter (a LoRA SFT output, say) is merged into a plain GPT first (merged True)."""
    import peft

    loaded = checkpoint.load(path, expect="gpt")
    if getattr(loaded.model, "peft_config", None) is None:
        return loaded, False
    if not peft.can_merge(loaded.model):
        raise ValueError(f"{path} carries a {loaded.model.peft_config.method!r} adapter, which cannot be merged "
                         f"into its weights; fine-tune its base model instead")
    peft.merge_and_unload(loaded.model)
    return loaded, True


def run_sft(scfg: SFTConfig, cfg: TrainConfig, peft_config=None) -> dict:
    """Fine-tune scfg.base and write the model folder to cfg.out_dir: the whole model for method "full", the
    adapter and the base's path for a PEFT method. Returns the results, "before" holding the base's metrics.
    cfg.resume continues the run in cfg.out_dir with the same settings; a folder holding another run is refused
    unless cfg.overwrite."""
    with claim(cfg.out_dir, cfg.resume, cfg.overwrite):
        return _run_sft(scfg, cfg, peft_config)


def check_same_settings(state: dict, settings: dict, out_dir, keys) -> None:
    """Refuse to resume a run with other settings than it started with, naming them."""
    recorded = state.get("settings", {})
    differ = {k: (settings[k], recorded.get(k)) for k in keys if recorded.get(k) != settings[k]}
    if differ:
        raise ValueError(f"--resume: the run in {out_dir} was started with other settings (now, then): {differ}")


def _run_sft(scfg: SFTConfig, cfg: TrainConfig, peft_config) -> dict:
    import peft

    loaded, merged = open_base(scfg.base)
    model, tokenizer = loaded.model, loaded.tokenizer
    train_examples, test_examples, source = sft_data(scfg)
    torch.manual_seed(cfg.seed)
    before = evaluate(model.to(select_device(cfg.device)), tokenizer, test_examples[: scfg.eval_examples])
    if peft_config is not None:
        peft.get_peft_model(model, peft_config)
    base = scfg.base if peft_config is not None and not merged else None  # an adapter goes on the base as saved
    made_from = {"base": str(scfg.base), "data": source}
    settings = {"sft": dataclasses.asdict(scfg), "train": dataclasses.asdict(cfg),
                "peft": None if peft_config is None else dataclasses.asdict(peft_config)}
    out = Path(cfg.out_dir)
    state = checkpoint.load_resume_checkpoint(out) if cfg.resume else None
    if state is not None:
        check_same_settings(state, settings, out, ("sft", "peft"))
    meta = checkpoint.describe(model, "sft", tasks.TEMPLATE, made_from, settings, base=base, where=out)
    results = finetune(model, tokenizer, train_examples, test_examples, None, cfg, scfg.eval_examples, meta, state)
    results["before"] = before
    results["saved"] = str(checkpoint.save_model(out, model.cpu(), tokenizer, "sft", tasks.TEMPLATE, made_from,
                                                 settings, base=base))
    return results
