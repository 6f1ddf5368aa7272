"""The one training loop, shared by pretraining, SFT (any PEFT method) and reward modelling; and the pretraining CLI.

    train(model, get_batch, loss_fn, cfg, eval_fn)

- ``get_batch(generator)`` draws one micro-batch with the torch.Generator it is given. The loop seeds a fresh generator
  for every micro-batch from (seed, iteration, micro-batch index), so the data a run sees depends on nothing else:
  a resumed run sees the same batches as an uninterrupted one, and N processes see the same global batch as one
  process accumulating N micro-batches (each rank draws different micro-batches).
- ``loss_fn(model, batch)`` returns the scalar loss, or (loss, {name: scalar tensor}) whose values are averaged over
  the iterations between two metrics rows and logged as ``train_<name>`` (DPO logs its implicit rewards this way);
  ``eval_fn(model)`` returns metrics including ``val_loss``.

What the loop does: AdamW with weight decay on weight matrices only, linear warm-up then cosine decay to min_lr,
gradient accumulation, gradient clipping, mixed precision on GPUs, DistributedDataParallel under torchrun,
a progress bar, metrics.jsonl, a loss-curve PNG, atomic checkpoints (latest and best) that resume exactly.

Pretraining, the first stage, is at the bottom: ``pretrain(PretrainConfig(...), TrainConfig(...))``, and its command
line ``python -m minigpt.train --help`` (with no --data it trains on the built-in corpus).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import describe, load_checkpoint, save_checkpoint, save_model
from .config import ACTIVATIONS, PRESETS, GPTConfig, preset
from .device import Processes, init_processes, maybe_compile, precision, select_device
from .model import GPT
from .options import HelpFormatter, add_options, from_args, option, parse, run
from .runs import Interrupted, claim, stop_requests


@dataclass
class TrainConfig:
    max_iters: int = option(2000, "optimizer steps")
    batch_size: int = option(12, "sequences per micro-batch")
    lr: float = option(1e-3, "peak learning rate (after the warm-up)")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "iterations of linear warm-up from 0 to lr")
    lr_decay_iters: int | None = option(None, "iteration where the cosine decay reaches min_lr (none: max_iters)")
    weight_decay: float = option(0.1, "AdamW weight decay on the weight matrices")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    gradient_accumulation_steps: int = option(1, "micro-batches per iteration, over all processes together")
    eval_interval: int = option(250, "evaluate (and checkpoint) every this many iterations, and at the end")
    eval_iters: int = option(20, "batches of the validation split per evaluation (pretraining: at most the windows "
                             "that fit in the split without overlap)")
    log_interval: int = option(10, "write a metrics row every this many iterations")
    out_dir: str = option("out/pretrain", "where checkpoints, metrics.jsonl and loss.png go")
    seed: int = option(1337, "seed of the initial weights and of every batch")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    dtype: str = option("auto", "auto (bfloat16 on GPUs that support it, float16 on others, float32 on CPU), "
                        "float32, bfloat16, float16", choices=["auto", "float32", "bfloat16", "float16"])
    compile: bool = option(False, "torch.compile the model")
    decay_embeddings: bool = option(False, "apply weight decay to the embeddings too")
    save_trainable_only: bool = option(False, "checkpoints hold only the trained tensors (PEFT)")
    resume: bool = option(False, "continue the run in OUT_DIR from its ckpt.pt")
    overwrite: bool = option(False, "replace the run already in OUT_DIR (without it, an existing run is refused)")
    progress: bool = option(True, "show a progress bar")
    plot: bool = option(True, "draw loss.png at the end")

    def __post_init__(self):
        for name in ("max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                     "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues a run and --overwrite replaces it: give one of them")


def train_config_from(parser, args, **overrides) -> TrainConfig:
    """TrainConfig from a command line's flags. A warm-up as long as the run (the default 100 with --max-iters 20,
    say) would keep the learning rate from ever reaching lr: given on purpose it is refused; left at its default it
    is shortened to a tenth of the run, with a note."""
    cfg = from_args(TrainConfig, args, **overrides)
    if cfg.warmup_iters >= cfg.max_iters > 1:
        if "warmup_iters" in getattr(args, "given", ()):
            raise ValueError(f"--warmup-iters {cfg.warmup_iters} >= --max-iters {cfg.max_iters}: the learning rate "
                             f"would never reach --lr {cfg.lr:g}; lower --warmup-iters or raise --max-iters")
        print(f"note: the warm-up is shortened to {cfg.max_iters // 10} iterations (a tenth of --max-iters "
              f"{cfg.max_iters}; the default {cfg.warmup_iters} would outlast the run)", flush=True)
        cfg = dataclasses.replace(cfg, warmup_iters=cfg.max_iters // 10)
    return cfg


# -- learning rate and optimizer ------------------------------------------------------------------------------


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_iters, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = False):
    """Two AdamW groups: weight decay on the weight matrices of Linear layers (and of the embeddings if
    decay_embeddings); none on biases, LayerNorm gains or, by default, the embeddings. Decaying an embedding
    shrinks the rows of rare tokens, which get few gradient updates to push back, so we leave them alone."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # distinct parameters: the tied head appears once
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def configure_optimizer(model, cfg: TrainConfig, device_type: str, eps: float = 1e-8):
    """AdamW on param_groups, with its fused kernel on CPU and CUDA: one pass over all the tensors instead of a chain
    of small kernels per step (the same update up to float rounding; the README has the measured gain)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    if not groups[0]["params"] and not groups[1]["params"]:
        raise ValueError("the model has no trainable parameters")
    fused = device_type in ("cpu", "cuda") and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=eps, fused=fused or None)


# -- the loop's helpers ----------------------------------------------------------------------------------------


def _generator(seed: int, it: int, micro: int) -> torch.Generator:
    """The generator for micro-batch `micro` of iteration `it`: a pure function of the three numbers."""
    state = np.random.SeedSequence([seed, it, micro]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _n_tokens(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    first = next(iter(batch.values() if isinstance(batch, dict) else batch))
    return first.numel()


# -- the loop -------------------------------------------------------------------------------------------------


def train(model, get_batch, loss_fn, cfg: TrainConfig, eval_fn=None, meta: dict | None = None, resume=None,
          procs: Processes | None = None) -> list[dict]:
    """Train model in place and return the metrics rows. meta (model config, tokenizer, ...) goes into every
    checkpoint; resume is a checkpoint dict to continue from. Returns the metrics written to metrics.jsonl."""
    procs = procs or init_processes()
    device = select_device(cfg.device, procs.local_rank)
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed + procs.rank)  # dropout differs across ranks, as the data does
    model.to(device)
    raw_model = model
    optimizer = configure_optimizer(raw_model, cfg, device.type)
    autocast, scaler = precision(device, cfg.dtype)
    accum = micro_batches_per_process(cfg.gradient_accumulation_steps, procs)
    start, best_val, elapsed_before = 0, float("inf"), 0.0
    if resume is not None:
        check_same_model(resume, meta, out_dir)
        raw_model.load_state_dict(resume["model"], strict=not cfg.save_trainable_only)
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if procs.world_size == 1:
            torch.set_rng_state(resume["rng"])  # dropout continues exactly where it stopped
        else:
            torch.manual_seed(cfg.seed + procs.rank + resume["iter"])
        start, best_val, elapsed_before = resume["iter"] + 1, resume["best_val_loss"], resume.get("elapsed_s", 0.0)
    model = maybe_compile(model, device, cfg.compile)  # eager, with a message, when no compiler is installed
    if procs.world_size > 1:
        model = DDP(model, device_ids=[procs.local_rank] if device.type == "cuda" else None)

    metrics_path = out_dir / "metrics.jsonl"
    rows = _start_metrics(metrics_path, start) if procs.is_main else []
    bar = _progress(cfg, start, procs)
    t0, tokens_seen, n_loss = time.perf_counter(), 0, 0
    loss_sum, extra_sums = torch.zeros((), device=device), {}  # summed on the device, read once per metrics row
    with stop_requests() as stop:
        for it in range(start, cfg.max_iters):
            lr = lr_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            for micro in range(accum):
                global_micro = procs.rank * accum + micro
                batch = _to_device(get_batch(_generator(cfg.seed, it, global_micro)), device)
                tokens_seen += _n_tokens(batch) * procs.world_size
                last = micro == accum - 1
                with (model.no_sync() if procs.world_size > 1 and not last else contextlib.nullcontext()), autocast:
                    out = loss_fn(model, batch)
                    loss, extra = out if isinstance(out, tuple) else (out, {})
                    loss = loss / accum
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach().float()
                for k, v in extra.items():
                    extra_sums[k] = extra_sums.get(k, 0.0) + v.detach().float() / accum
            if cfg.grad_clip > 0:
                if scaler:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_loss += 1

            elapsed = time.perf_counter() - t0
            is_eval = it % cfg.eval_interval == 0 or it == cfg.max_iters - 1
            if bar is not None:
                bar.update(1)
            if is_eval or it % cfg.log_interval == 0:
                train_loss = mean_over_processes(loss_sum / n_loss, procs)  # the loss of every process's batches
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"the training loss is {train_loss} at iteration {it}; stopping. Nothing was saved from the "
                        f"diverged model; {_kept(out_dir)}. Try a lower --lr or gradient clipping (--grad-clip)")
                row = {"iter": it, "train_loss": train_loss, "val_loss": None, "lr": lr,
                       "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
                       "elapsed_s": round(elapsed_before + elapsed, 3)}
                row.update({f"train_{k}": (v / n_loss).item() for k, v in extra_sums.items()})
                loss_sum, n_loss, extra_sums = torch.zeros((), device=device), 0, {}
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}")
                if is_eval and eval_fn is not None and procs.is_main:
                    row.update(eval_fn(raw_model))
                    message = f"iter {it}: train_loss {row['train_loss']:.4f}, " + ", ".join(
                        f"{k} {v:.4f}" for k, v in row.items() if k not in ("iter", "train_loss", "lr", "tokens_per_s",
                                                                              "elapsed_s") and isinstance(v, float))
                    bar.write(message) if bar is not None else print(message, flush=True)
                if procs.is_main:
                    rows.append(row)
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if is_eval and procs.is_main:
                    val = row.get("val_loss")
                    if val is not None and not math.isfinite(val):
                        raise FloatingPointError(f"the validation loss is {val} at iteration {it}; stopping without "
                                                 f"saving the diverged model; {_kept(out_dir)}")
                    improved = val is not None and val < best_val
                    best_val = val if improved else best_val
                    state = _checkpoint_state(raw_model, optimizer, scaler, it, best_val, elapsed_before + elapsed,
                                              cfg, meta)
                    save_checkpoint(out_dir / "ckpt.pt", state)
                    if improved:
                        save_checkpoint(out_dir / "best.pt", state)
            if any_process(bool(stop), procs) and it < cfg.max_iters - 1:  # Ctrl-C: save the last finished step
                if procs.is_main:
                    save_checkpoint(out_dir / "ckpt.pt", _checkpoint_state(raw_model, optimizer, scaler, it, best_val,
                                                                           elapsed_before + elapsed, cfg, meta))
                if bar is not None:
                    bar.close()
                raise Interrupted(out_dir, it)
    if bar is not None:
        bar.close()
    if procs.is_main and cfg.plot and rows:
        plot_losses(rows, out_dir / "loss.png")
    return rows


def check_same_model(resume: dict, meta: dict | None, out_dir) -> None:
    """Refuse a checkpoint of a model other than the one being trained, naming what differs: weights of the same
    shapes load cleanly into a model with another GELU or layout (a base re-pretrained between two runs)."""
    if not meta or "model_config" not in meta or "model_config" not in resume:
        return
    now, then = (GPTConfig.from_dict(c).to_dict() for c in (meta["model_config"], resume["model_config"]))
    differ = {k: (v, then[k]) for k, v in now.items() if v != then[k]}
    if differ:
        raise ValueError(f"--resume: the checkpoint in {out_dir} is of another model than the one given now (now, "
                         f"checkpoint): {differ}; resume from the model the run started from, or start afresh")


def micro_batches_per_process(accumulation_steps: int, procs: Processes) -> int:
    """Micro-batches each process draws per iteration. The default of 1 under torchrun becomes one per process
    (world_size in all, the same global batch as one process accumulating world_size micro-batches)."""
    if accumulation_steps % procs.world_size == 0:
        return accumulation_steps // procs.world_size
    if accumulation_steps == 1:
        if procs.is_main:
            print(f"{procs.world_size} processes: one micro-batch each per iteration (as "
                  f"--gradient-accumulation-steps {procs.world_size} in one process)", flush=True)
        return 1
    raise ValueError(f"gradient_accumulation_steps ({accumulation_steps}) must be divisible by the number of "
                     f"processes ({procs.world_size})")


def mean_over_processes(value: torch.Tensor, procs: Processes) -> float:
    if procs.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= procs.world_size
    return value.item()


def any_process(flag: bool, procs: Processes) -> bool:
    """Whether the flag is set in any process (every process then stops at the same iteration)."""
    if procs.world_size == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _kept(out_dir: Path) -> str:
    """Which checkpoints are intact, for a message."""
    kept = [f"{name} (iteration {load_checkpoint(out_dir / name)['iter']})" for name in ("ckpt.pt", "best.pt")
            if (out_dir / name).is_file()]
    return f"the checkpoints in {out_dir} are intact: {', '.join(kept)}" if kept else "no checkpoint had been written"


def _checkpoint_state(model, optimizer, scaler, it, best_val, elapsed, cfg, meta):
    state_dict = model.state_dict()
    if cfg.save_trainable_only:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state_dict = {k: v for k, v in state_dict.items() if k in trainable}
    return {
        "model": state_dict,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "iter": it,
        "best_val_loss": best_val,
        "elapsed_s": elapsed,
        "rng": torch.get_rng_state(),  # the main process's; other ranks reseed on resume
        "train_config": dataclasses.asdict(cfg),
        **(meta or {}),
    }


def _start_metrics(path: Path, start: int) -> list[dict]:
    """Rows already written for iterations before start (a resumed run drops the later ones and appends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if start > 0 and path.is_file():
        rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["iter"] < start]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _progress(cfg, start, procs):
    if not (cfg.progress and procs.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_iters, initial=start, desc=Path(cfg.out_dir).name, dynamic_ncols=True)


def plot_losses(rows: list[dict], path) -> None:
    """Training loss (every logged iteration) and validation loss (every evaluation) against iterations. Drawn on
    a Figure of its own, not through pyplot: no display needed, and a notebook's backend is left alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["iter"] for r in rows], [r["train_loss"] for r in rows], label="train (running mean)", lw=1)
    val = [r for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot([r["iter"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"Loss curve: {Path(path).parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- pretraining: the first stage, and its command line ----------------------------------------------------------


@dataclass
class PretrainConfig:
    """What to pretrain on and the model's shape (the optimisation is a TrainConfig)."""

    data: list[str] | None = option(None, "text file(s) to train on (default: the built-in corpus)")
    tokenizer: str = option("bpe", "bpe | char | gpt2 | cl100k_base | path/to/tokenizer.json")
    vocab_size: int = option(512, "BPE vocabulary size when --tokenizer bpe")
    corpus_seed: int = option(0, "seed of the built-in corpus")
    corpus_chars: int = option(1_500_000, "size of the built-in corpus in characters")
    data_dir: str | None = option(None, "where the token ids are cached (default: OUT_DIR/data)")
    preset: str = option("baby", "model size; the shape options below override it", choices=sorted(PRESETS))
    n_layer: int | None = option(None, "blocks (default: the preset's)")
    n_head: int | None = option(None, "attention heads (default: the preset's)")
    n_embd: int | None = option(None, "embedding width (default: the preset's)")
    block_size: int | None = option(None, "context length in tokens (default: the preset's)")
    dropout: float = option(0.0, "dropout probability")
    layout: str = option("pre_ln", "pre_ln (GPT-2) or post_ln (BERT)", choices=["pre_ln", "post_ln"])
    bias: bool = option(True, "biases in the Linear layers and LayerNorms (GPT-2 has them; nanoGPT leaves them out)")
    activation: str = option("gelu", "the MLP's GELU: gelu (exact, with erf, as nanoGPT; cheaper on CPUs) or gelu_tanh "
                             "(GPT-2's tanh approximation)", choices=list(ACTIVATIONS))

    def model_config(self, vocab_size: int) -> GPTConfig:
        sizes = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k)}
        return preset(self.preset, vocab_size=vocab_size, dropout=self.dropout, layout=self.layout, bias=self.bias,
                      activation=self.activation, **sizes)


def load_documents(pcfg: PretrainConfig) -> tuple[list[str], str]:
    """The documents to train on and a one-line description of where they came from."""
    if pcfg.data:
        from .data import read_texts

        return read_texts(pcfg.data), ", ".join(pcfg.data)
    from .corpus import build_corpus

    text = build_corpus(seed=pcfg.corpus_seed, n_chars=pcfg.corpus_chars)
    return [d + "\n" for d in text.split("\n\n") if d.strip()], f"built-in corpus (seed {pcfg.corpus_seed})"


def pretrain(pcfg: PretrainConfig, cfg: TrainConfig, procs: Processes | None = None) -> dict:
    """Tokenise the data, build the GPT, train it with the loop above and save the best model as a model folder in
    cfg.out_dir (beside the run's checkpoints). Returns the results: validation loss, iterations, time, size.
    cfg.resume continues the run in cfg.out_dir, on the same data and tokenizer (anything else is refused); a folder
    holding another run is refused unless cfg.overwrite."""
    procs = procs or init_processes()
    with claim(cfg.out_dir, cfg.resume, cfg.overwrite, procs.is_main):
        return _pretrain(pcfg, cfg, procs)


def check_resume(state: dict, pcfg: PretrainConfig, data, out_dir) -> None:
    """Refuse to continue a run on other data, another tokenizer or another model shape, naming what differs."""
    recorded = state.get("made_from", {}).get("data_fingerprint")
    if recorded is not None and recorded != data.fingerprint:
        raise ValueError(f"--resume: the data ({data.source}) is not the data the run in {out_dir} was trained on "
                         f"(fingerprint {data.fingerprint} vs {recorded}); resume with the same --data")
    if state["tokenizer"] != data.tokenizer.to_dict():
        raise ValueError(f"--resume: the tokenizer ({data.tokenizer.name}) is not the one the run in {out_dir} used")
    shape = pcfg.model_config(data.tokenizer.vocab_size).to_dict()
    run_shape = GPTConfig.from_dict(state["model_config"]).to_dict()  # fields a run saved before they existed: defaults
    differ = {k: (shape[k], v) for k, v in run_shape.items() if shape.get(k) != v}
    if differ:
        raise ValueError(f"--resume: the model options differ from the run's (now, run): {differ}; a resumed run "
                         f"keeps its model (a run saved before --activation existed has activation gelu_tanh)")


# tokens per evaluation pass: on a CPU, passes whose activations stay in the caches are the fastest (the README has
# the measurements); a GPU wants large ones
EVAL_TOKENS_CPU = 2048
EVAL_TOKENS_GPU = 8192


def _pretrain(pcfg: PretrainConfig, cfg: TrainConfig, procs: Processes) -> dict:
    from .checkpoint import load_resume_checkpoint
    from .data import fixed_windows, prepare, random_batch, window_batches

    state = load_resume_checkpoint(cfg.out_dir) if cfg.resume else None
    documents, source = load_documents(pcfg)
    for turn in ("main", "others"):  # the main process tokenises; the others then read what it wrote
        if (turn == "main") == procs.is_main:
            data = prepare(documents, pcfg.data_dir or Path(cfg.out_dir) / "data", pcfg.tokenizer, pcfg.vocab_size,
                           source=source)
        if procs.world_size > 1:
            dist.barrier()
    tokenizer = data.tokenizer
    if state is not None:
        check_resume(state, pcfg, data, cfg.out_dir)
    model_config = pcfg.model_config(tokenizer.vocab_size)
    data.check_length(model_config.block_size)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process and every run
    model = GPT(model_config)
    model.check_tokenizer(tokenizer)
    T = model_config.block_size
    asked = cfg.eval_iters * cfg.batch_size
    val_offsets = fixed_windows(data.val, asked, T)  # fewer than asked when that many would overlap
    if state is not None and state.get("eval_windows", asked) != len(val_offsets) and procs.is_main:
        print(f"note: the run's earlier validation losses were measured on {state.get('eval_windows', asked):,} "
              f"windows (a version that let them overlap), from now on on {len(val_offsets):,}; its best model is "
              "chosen across both", flush=True)

    def get_batch(generator):
        return random_batch(data.train, cfg.batch_size, T, generator)

    def loss_fn(m, batch):
        return m(batch[0], batch[1])[1]

    # the same windows every evaluation, in forward passes of EVAL_TOKENS tokens (no gradients to keep; at least a
    # training batch, at most 2^24 logits, 64 MiB): the mean over the windows is what it was in batches
    def eval_batch(device):
        tokens = EVAL_TOKENS_CPU if device.type == "cpu" else EVAL_TOKENS_GPU
        return max(cfg.batch_size, min(tokens, 2**24 // tokenizer.vocab_size) // T)

    @torch.inference_mode()  # no autograd bookkeeping at all (cheaper than no_grad)
    def evaluate(m):
        m.eval()
        device = next(m.parameters()).device
        losses = [m(x.to(device), y.to(device))[1] * len(x)  # a batch's mean, weighted by its windows
                  for x, y in window_batches(data.val, val_offsets, eval_batch(device), T)]
        return {"val_loss": torch.stack(losses).cpu().double().sum().item() / len(val_offsets)}  # one sync in all

    if procs.is_main:
        print(f"data: {source}: {len(data.train):,} train / {len(data.val):,} validation tokens, "
              f"tokenizer {tokenizer.name}")
        print(f"model: {model.num_parameters():,} parameters, {model_config}")
        print(f"evaluation: {len(val_offsets):,} validation windows of {T} tokens" + (
            f" (all that fit without overlap; --eval-iters x --batch-size asked for {asked:,})"
            if len(val_offsets) < asked else ""))
    made_from = {"data": source, "tokenizer": pcfg.tokenizer, "data_fingerprint": data.fingerprint}
    settings = {"pretrain": dataclasses.asdict(pcfg), "train": dataclasses.asdict(cfg)}
    info = describe(model, "pretrain", made_from=made_from, settings=settings)
    rows = train(model, get_batch, loss_fn, cfg, evaluate,
                 meta=dict(info, tokenizer=tokenizer.to_dict(), eval_windows=len(val_offsets)),
                 resume=state, procs=procs)
    results = {"params": model.num_parameters(), "out_dir": cfg.out_dir}
    if procs.is_main:
        best = load_checkpoint(Path(cfg.out_dir) / "best.pt")
        model.load_state_dict(best["model"])
        save_model(cfg.out_dir, model.cpu(), tokenizer, "pretrain", made_from=made_from, settings=settings)
        last = [r for r in rows if r.get("val_loss") is not None][-1]
        results.update(val_loss=last["val_loss"], best_val_loss=best["best_val_loss"], iters=last["iter"] + 1,
                       train_s=last["elapsed_s"])
        print(f"final validation loss {last['val_loss']:.4f} after {last['iter'] + 1} iterations, "
              f"{last['elapsed_s']:.1f} s; the best model (validation loss {best['best_val_loss']:.4f}) is in "
              f"{cfg.out_dir}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minigpt.train",
        description="Pretrain a GPT on text: the built-in corpus by default, or your own files with --data. "
        "Runs on several processes with torchrun --nproc_per_node=N -m minigpt.train ...",
        formatter_class=HelpFormatter,
    )
    data_and_model = p.add_argument_group("data and model")
    data_and_model.add_argument("--data", nargs="+", help="text file(s) to train on (default: the built-in corpus)")
    add_options(data_and_model, PretrainConfig, skip=("data",))
    add_options(p.add_argument_group("training"), TrainConfig, skip=("save_trainable_only",))
    return p


def recorded_settings(parser, args) -> PretrainConfig:
    """With --resume: the data and model options the run recorded, refusing a flag given now that differs."""
    from .checkpoint import load_resume_checkpoint

    state = load_resume_checkpoint(args.out_dir)
    recorded = state.get("settings", {}).get("pretrain")
    if recorded is None:
        return from_args(PretrainConfig, args)
    # a run recorded before --activation existed was built with GPT-2's tanh GELU, the GPTConfig default it loads with
    recorded = {"activation": GPTConfig.from_dict(state["model_config"]).activation, **recorded}
    names = [f.name for f in dataclasses.fields(PretrainConfig)]
    given = {n: getattr(args, n) for n in names if n in args.given}
    differ = {n: (v, recorded[n]) for n, v in given.items() if v != recorded[n]}
    if differ:
        raise ValueError(f"--resume continues the run as it was; these options differ from it (given, run): "
                         f"{differ}")
    return PretrainConfig(**recorded)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parse(parser, argv)
    cfg = train_config_from(parser, args)
    pcfg = recorded_settings(parser, args) if cfg.resume else from_args(PretrainConfig, args)
    results = pretrain(pcfg, cfg)
    if dist.is_initialized():
        dist.barrier()  # no process tears down while another is still at work (gloo has aborted one that was)
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    run(main)
