"""Pretraining benchmark on tinyshakespeare (char tokenizer): nanoGPT's documented CPU "baby" run, side by side.

nanoGPT's README runs, on a laptop CPU, 4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iterations, lr 1e-3
decaying to 1e-4, warm-up 100, dropout 0, no biases (its default), and reports a validation loss of about 1.88 in
about 3 minutes. Its config file evaluates every 250 iterations on 200 batches of each split. This script runs, in
one process tree, one after the other:

1. that configuration through minigpt's trainer (``python -m minigpt.train``, evaluating the validation split on
   200 fixed batches at the same iterations) and, when a checkout of nanoGPT is given (--nanogpt or NANOGPT_DIR),
   nanoGPT's own ``train.py`` with the same flags, both as fresh processes timed from start to end, in turn
   (nanoGPT first in odd rounds, minigpt first in even ones) for --rounds rounds: the ratio of wall times is the
   figure, since both see the same load. nanoGPT's code is copied into the output folder at run time, never into
   this repository;
2. when the reference environment exists (``.venv-ref``, built by ``make parity``): transformers' GPT2LMHeadModel
   and minigpt's GPT from the same initial weights (GPT-2 has biases, so both do here), each trained by minigpt's
   loop on the same batches: the same loss to four decimals says the model is the same, the time ratio says how fast;
3. "better defaults" in less wall time, two seeds.

``--profile`` instead measures where a training step's time goes (data, attention, MLP, the rest of the forward and
backward, gradient clipping, the optimizer, evaluation) at the baby shape and at 6 layers x 384, and what
torch.compile and the fused AdamW kernel change there.

    python benchmarks/bench_pretrain.py --data ../shared/data/tinyshakespeare.txt --nanogpt path/to/nanoGPT
    python benchmarks/bench_pretrain.py --profile --threads 1
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after site-packages: in .venv-ref, Hugging Face's peft must win over this repo's
REFERENCE_PYTHON = REPO / ".venv-ref" / "bin" / "python"

# nanoGPT's baby run: config/train_shakespeare_char.py plus the flags of its README's CPU command (eval_iters as in
# the config file); weight decay 0.1, beta2 0.99 and gradient clipping 1.0 are the defaults on both sides
BABY = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12, "lr": 1e-3, "min_lr": 1e-4,
        "warmup_iters": 100, "max_iters": 2000, "lr_decay_iters": 2000, "eval_interval": 250, "eval_iters": 200}


def nanogpt_flags(config: dict) -> list[str]:
    """nanoGPT's command line for a config like BABY (its README's CPU command, eval_iters as in its config file)."""
    return ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--log_interval=10",
            "--dropout=0.0", *(f"--{k}={config[k]}" for k in ("eval_iters", "eval_interval", "block_size",
                                                               "batch_size", "n_layer", "n_head", "n_embd",
                                                               "max_iters", "lr_decay_iters"))]


def cli_args(config: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in config.items()]


def summary(name: str, args: str, rows: list[dict], wall: float, cpu: float | None = None) -> dict:
    vals = [r for r in rows if r.get("val_loss") is not None]
    return {"name": name, "args": args, "val_loss": vals[-1]["val_loss"], "iters": vals[-1]["iter"] + 1,
            "train_s": vals[-1]["elapsed_s"], "wall_s": wall, "cpu_s": cpu,
            "curve": [(r["iter"], r["val_loss"]) for r in vals],
            "load_after": os.getloadavg()[:2] if hasattr(os, "getloadavg") else None}  # 1- and 5-minute load


# ----------------------------------------------------------------------------------------------------------
# 1. minigpt's trainer and nanoGPT, each a fresh process


def timed_process(cmd: list[str], cwd, capture: bool = False) -> tuple[str, float, float | None]:
    """Run cmd to its end: (its stdout if capture, wall seconds, CPU seconds (user + system) of the process and
    the children it waited for, read by os.wait4, so that processes running at the same time are told apart)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL, text=True)
    out = proc.stdout.read() if capture else ""
    if hasattr(os, "wait4"):
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
    else:  # no wait4 (Windows): wall time only
        proc.wait()
        cpu = None
    wall = time.perf_counter() - t0
    if proc.stdout:
        proc.stdout.close()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out)
    return out, wall, cpu


def run_minigpt(name: str, data: str, out: Path, config: dict, flags: tuple = ()) -> dict:
    """python -m minigpt.train with the config's flags (no biases, as nanoGPT), timed from start to end."""
    out_dir = out / re.sub(r"\W+", "_", name).strip("_")
    cmd = [sys.executable, "-m", "minigpt.train", "--data", data, "--out-dir", str(out_dir), "--tokenizer", "char",
           "--dropout=0.0", "--no-bias", "--no-progress", "--overwrite", *cli_args(config), *flags]
    _, wall, cpu = timed_process(cmd, REPO)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    changed = cli_args({k: v for k, v in config.items() if BABY.get(k) != v})  # flags beyond the baby config
    return summary(name, " ".join([*changed, *flags]) or "-", rows, wall, cpu)


def prepare_nanogpt(nanogpt: Path, data: str, work: Path) -> Path:
    """A working copy of nanoGPT's training files in work/, with tinyshakespeare prepared by its own prepare.py."""
    for f in ("train.py", "model.py", "configurator.py"):
        if not (nanogpt / f).is_file():
            raise SystemExit(f"{nanogpt} is not a nanoGPT checkout: {f} is missing")
    work.mkdir(parents=True, exist_ok=True)
    for f in ("train.py", "model.py", "configurator.py"):
        shutil.copy(nanogpt / f, work / f)
    shutil.copytree(nanogpt / "config", work / "config", dirs_exist_ok=True)
    data_dir = work / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(nanogpt / "data" / "shakespeare_char" / "prepare.py", data_dir / "prepare.py")
    shutil.copy(data, data_dir / "input.txt")  # prepare.py downloads only when input.txt is missing
    subprocess.run([sys.executable, "prepare.py"], check=True, cwd=data_dir, stdout=subprocess.DEVNULL)
    return work


def run_nanogpt(work: Path, name: str, config: dict) -> dict:
    """nanoGPT's train.py with the README's CPU flags, timed from start to end; its evaluations parsed from stdout."""
    flags = nanogpt_flags(config)
    stdout, wall, cpu = timed_process([sys.executable, "train.py", *flags], work, capture=True)
    evals = [(int(i), float(v)) for i, v in re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", stdout)]
    rows = [{"iter": i, "val_loss": v, "elapsed_s": wall} for i, v in evals]
    return summary(name, "nanoGPT's train.py " + " ".join(flags[:3]), rows, wall, cpu) | {"iters": evals[-1][0] + 1}


def side_by_side(args, out: Path) -> list[dict]:
    """minigpt's trainer on nanoGPT's configuration, and nanoGPT itself when given, in turn for args.rounds rounds."""
    nanogpt = Path(args.nanogpt) if args.nanogpt else None
    work = prepare_nanogpt(nanogpt, args.data, out / "nanogpt") if nanogpt else None
    if not nanogpt:
        print("no nanoGPT checkout (--nanogpt or NANOGPT_DIR): timing minigpt alone")
    config = dict(BABY, max_iters=args.iters, lr_decay_iters=args.iters, eval_interval=min(250, args.iters // 2))
    variants = {"minigpt": ()} | ({"minigpt --compile": ("--compile",)} if args.compile else {})
    results = []
    for r in range(args.rounds):
        order = ["nanoGPT", *variants] if r % 2 == 0 else [*variants, "nanoGPT"]
        order = [name for name in order if name != "nanoGPT" or work is not None]

        def one(name, r=r):
            label = f"{name}, round {r + 1}"
            res = run_nanogpt(work, label, config) if name == "nanoGPT" else run_minigpt(label, args.data, out, config,
                                                                                           variants[name])
            cpu = f", CPU {res['cpu_s']:.1f} s" if res["cpu_s"] is not None else ""
            print(f"  {label}: val {res['val_loss']:.4f}, {res['wall_s']:.1f} s{cpu}", flush=True)
            return res | {"kind": name}

        if args.together:  # all at once: each sees the same load for the same time
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(order)) as pool:
                results += list(pool.map(one, order))
        else:
            results += [one(name) for name in order]
    return results


def side_by_side_ratios(results: list[dict]) -> list[str]:
    """One line per variant: its wall time over nanoGPT's in the same round, and the median over rounds."""
    by_round = defaultdict(dict)
    for r in results:
        by_round[r["name"].rsplit("round ", 1)[1]][r["kind"]] = r
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in results if r["kind"] != "nanoGPT"):
        for what, key in (("wall time", "wall_s"), ("CPU time", "cpu_s")):
            ratios = [rnd[kind][key] / rnd["nanoGPT"][key] for rnd in by_round.values()
                      if "nanoGPT" in rnd and rnd[kind].get(key) and rnd["nanoGPT"].get(key)]
            if ratios:
                lines.append(f"{kind} / nanoGPT {what}: {statistics.median(ratios):.3f} (rounds: "
                             f"{', '.join(f'{x:.3f}' for x in ratios)}; goal <= 0.8)")
    return lines


# ----------------------------------------------------------------------------------------------------------
# 2. transformers' GPT-2 and minigpt from the same initial weights, through minigpt's loop (in .venv-ref)


def run_same_init_pair(data: str, out: Path, config: dict, iters: int, seed: int) -> list[dict]:
    """transformers' GPT-2 and minigpt's GPT from the same initial weights, each trained by minigpt's loop.

    GPT2LMHeadModel is built with HF's initialisation (GPT-2's: normal 0.02, residual projections scaled by
    1/sqrt(2 n_layer), as minigpt's own), saved, and loaded into minigpt with GPT.from_pretrained. Both then see the
    same batches (the loop seeds every micro-batch from the run's seed and the iteration), so only the model code
    differs between the two curves."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, GPT2Config

    from minigpt import GPT
    from minigpt.data import fixed_windows, prepare, random_batch, read_texts, window_batches
    from minigpt.train import TrainConfig, train

    tokens = prepare(read_texts([data]), out / "same_init" / "data", "char", source=data)
    T = config["block_size"]
    torch.manual_seed(seed)
    hf_config = GPT2Config(vocab_size=tokens.tokenizer.vocab_size, n_positions=T, n_layer=config["n_layer"],
                           n_head=config["n_head"], n_embd=config["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = GPT.from_pretrained(d)
    losses = {  # (model, (x, y)) -> mean cross-entropy
        "transformers GPT-2": lambda m, b: F.cross_entropy(m(input_ids=b[0]).logits.flatten(0, 1), b[1].flatten()),
        "minigpt": lambda m, b: m(b[0], b[1])[1],
    }
    results = []
    for (name, loss_fn), model in zip(losses.items(), (hf, ours)):
        cfg = TrainConfig(max_iters=iters, lr_decay_iters=iters, batch_size=config["batch_size"], lr=config["lr"],
                          min_lr=config["min_lr"], warmup_iters=config["warmup_iters"],
                          eval_interval=config["eval_interval"], eval_iters=config["eval_iters"],
                          out_dir=str(out / "same_init" / name.split()[0]), seed=seed, progress=False, plot=False)
        val_offsets = fixed_windows(tokens.val, cfg.eval_iters * cfg.batch_size, T)

        @torch.inference_mode()
        def evaluate(m, loss_fn=loss_fn, cfg=cfg, val_offsets=val_offsets):
            m.eval()
            batches = window_batches(tokens.val, val_offsets, cfg.batch_size, T)
            values = [loss_fn(m, b).item() * len(b[0]) for b in batches]  # a batch's mean, weighted by its windows
            return {"val_loss": sum(values) / len(val_offsets)}

        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a fresh run each time
        t0 = time.perf_counter()
        rows = train(model, lambda g, cfg=cfg: random_batch(tokens.train, cfg.batch_size, T, g), loss_fn, cfg,
                     evaluate, meta={"stage": "pretrain", "model": name})
        results.append(summary(f"{name}, same initial weights and loop", f"--seed={seed} (with biases)", rows,
                               time.perf_counter() - t0))
    return results


def reference_run(args, out: Path, iters: int) -> list[dict]:
    """Run run_same_init_pair in .venv-ref (a second process) and read its results back."""
    if args.no_reference:
        return []
    if not REFERENCE_PYTHON.exists():
        print("skipping the transformers runs: no .venv-ref (make parity builds it)")
        return []
    result = out / "transformers.json"
    cmd = [str(REFERENCE_PYTHON), __file__, "--data", args.data, "--out", str(out), "--transformers-only",
           "--iters", str(iters), "--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else [])
    subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------------------------------------
# --profile: where a training step's time goes


class ModuleTimer:
    """Seconds spent in the forward and the backward of the modules of each kind, read by hooks around them (exact
    on a CPU, where every operation runs before the next starts)."""

    def __init__(self, modules_by_kind: dict):
        self.seconds = defaultdict(float)  # (kind, "forward" | "backward") -> seconds
        self._started = {}
        for kind, modules in modules_by_kind.items():
            for m in modules:
                m.register_forward_pre_hook(self._start(kind, "forward"))
                m.register_forward_hook(self._stop(kind, "forward"))
                m.register_full_backward_pre_hook(self._start(kind, "backward"))
                m.register_full_backward_hook(self._stop(kind, "backward"))

    def _start(self, kind, phase):
        def hook(module, *_):
            self._started[id(module), phase] = time.perf_counter()
        return hook

    def _stop(self, kind, phase):
        def hook(module, *_):
            self.seconds[kind, phase] += time.perf_counter() - self._started.pop((id(module), phase))
        return hook


def profile_shape(name: str, shape: dict, batch: int, steps: int, vocab: int = 65) -> dict:
    """Milliseconds per training step by part, medians over `steps` steps, and the A/B comparisons of this issue."""
    from minigpt import GPT, GPTConfig
    from minigpt.data import random_batch
    from minigpt.device import compiler_missing
    from minigpt.train import TrainConfig, _generator, configure_optimizer, param_groups

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab, bias=False, activation="gelu", **shape)  # as pretraining builds it
    model = GPT(config)
    T = config.block_size
    tokens = torch.randint(0, vocab, (200_000,), generator=torch.Generator().manual_seed(0)).numpy().astype("uint16")
    fused = configure_optimizer(model, TrainConfig(), "cpu")
    foreach = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99), foreach=True)
    timer = ModuleTimer({"attention": [b.attn for b in model.encoder.blocks], "MLP": [b.mlp for b in model.encoder.blocks]})
    parts = defaultdict(list)
    warm = [False]  # set after two warm-up steps, which are not counted

    def clock(part, fn):
        t0 = time.perf_counter()
        out = fn()
        if warm[0]:
            parts[part].append(1e3 * (time.perf_counter() - t0))
        return out

    for it in range(steps + 2):
        warm[0] = it >= 2
        before = dict(timer.seconds)
        x, y = clock("data: a random batch", lambda: random_batch(tokens, batch, T, _generator(0, it, 0)))
        loss = clock("forward + loss", lambda: model(x, y)[1])
        clock("backward", loss.backward)
        after = dict(timer.seconds)  # the evaluation batches below run the modules' forward again
        clock("gradient clipping", lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer, label = (fused, "optimizer: fused AdamW (now)") if it % 2 else (foreach, "optimizer: foreach AdamW (before)")
        clock(label, optimizer.step)
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            clock("evaluation batch: no_grad (before)", lambda: model(x, y)[1].item())
        with torch.inference_mode():
            clock("evaluation batch: inference_mode (now)", lambda: model(x, y)[1].item())
        model.train()
        for kind in ("attention", "MLP"):
            for phase in ("forward", "backward"):
                spent = after.get((kind, phase), 0.0) - before.get((kind, phase), 0.0)
                clock(f"{kind} {phase}", lambda: None)  # a placeholder entry, replaced just below
                if warm[0]:
                    parts[f"{kind} {phase}"][-1] = 1e3 * spent
    ms = {k: statistics.median(v) for k, v in parts.items()}
    fb = ms["forward + loss"] + ms["backward"]
    ms["rest of forward + backward (embeddings, LayerNorms, output layer, loss)"] = fb - sum(
        ms[f"{k} {p}"] for k in ("attention", "MLP") for p in ("forward", "backward"))
    result = {"name": name, "batch": batch, "block": T, "ms": ms}

    missing = compiler_missing(torch.device("cpu"))
    if missing:
        result["compile"] = missing
        return result
    # torch.compile against eager on the step's forward + backward (a second copy of the model, same weights)
    compiled_model = GPT(config)
    compiled_model.load_state_dict(model.state_dict())
    compiled = torch.compile(compiled_model)
    t0 = time.perf_counter()
    x, y = random_batch(tokens, batch, T, _generator(0, 0, 0))
    compiled(x, y)[1].backward()
    compile_s = time.perf_counter() - t0
    times = {"eager": [], "compiled": []}
    for it in range(max(steps, 6)):
        x, y = random_batch(tokens, batch, T, _generator(1, it, 0))
        for kind in (("eager", "compiled") if it % 2 == 0 else ("compiled", "eager")):
            m = model if kind == "eager" else compiled
            t0 = time.perf_counter()
            m(x, y)[1].backward()
            times[kind].append(1e3 * (time.perf_counter() - t0))
        model.zero_grad(set_to_none=True)
        compiled_model.zero_grad(set_to_none=True)
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    result["compile"] = {"compile_s": compile_s, "eager_ms": eager, "compiled_ms": comp, "ratio": comp / eager}
    return result


def profile_table(results: list[dict], threads: int) -> str:
    lines = ["# Where a training step's time goes (minigpt, CPU)", "",
             f"torch {torch.__version__}, {threads} thread(s); no biases, vocabulary 65; milliseconds per step, medians; "
             "the share is of one training step (data + forward + backward + clipping + fused AdamW). Load average "
             f"(1 min) at the end: {args_load(os.getloadavg() if hasattr(os, 'getloadavg') else None)} on "
             f"{os.cpu_count()} CPUs: on a loaded machine the milliseconds include waiting for a CPU, the medians "
             "and the interleaved A/B ratios less so.", ""]
    for r in results:
        ms = r["ms"]
        step = sum(ms[k] for k in ("data: a random batch", "forward + loss", "backward", "gradient clipping",
                                   "optimizer: fused AdamW (now)"))
        lines += [f"## {r['name']}: batch {r['batch']}, block {r['block']}: one step {step:.1f} ms", "",
                  "| part | ms | share of a step |", "|---|---:|---:|"]
        order = ["data: a random batch", "attention forward", "attention backward", "MLP forward", "MLP backward",
                 "rest of forward + backward (embeddings, LayerNorms, output layer, loss)", "gradient clipping",
                 "optimizer: foreach AdamW (before)", "optimizer: fused AdamW (now)",
                 "evaluation batch: no_grad (before)", "evaluation batch: inference_mode (now)"]
        for k in order:
            lines.append(f"| {k} | {ms[k]:.2f} | {ms[k] / step:.1%} |")
        c = r["compile"]
        if isinstance(c, str):
            lines += ["", f"torch.compile: not measured ({c})."]
        else:
            lines += ["", f"torch.compile (forward + backward, interleaved with eager): {c['compiled_ms']:.1f} ms "
                      f"against eager {c['eager_ms']:.1f} ms, ratio {c['ratio']:.2f}, after {c['compile_s']:.0f} s of "
                      "compiling (less when inductor's cache in /tmp is warm from an earlier run)."]
        lines.append("")
    return "\n".join(lines)


def profile(args) -> None:
    shapes = {"baby 4x4x128": ({"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}, 12),
              "small 6x6x384": ({"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}, 12)}
    steps = {"baby 4x4x128": args.profile_steps, "small 6x6x384": max(4, args.profile_steps // 5)}
    results = []
    for name, (shape, batch) in shapes.items():
        results.append(profile_shape(name, shape, batch, steps[name]))
        print(f"  profiled {name}", file=sys.stderr, flush=True)
    table = profile_table(results, torch.get_num_threads())
    for folder, name in ((Path(args.results_dir), "profile.md"), (Path(args.out), "profile.json")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(table if name.endswith(".md") else json.dumps(results, indent=1))
    print(table)


# ----------------------------------------------------------------------------------------------------------
# Report


def eval_windows(data: str, config: dict) -> int:
    """The validation windows minigpt's trainer evaluates for config (at most those that fit without overlap)."""
    from minigpt.data import fixed_windows, prepare, read_texts

    with tempfile.TemporaryDirectory() as d:
        val = prepare(read_texts([data]), Path(d), "char", source=data).val
    return len(fixed_windows(val, config["eval_iters"] * config["batch_size"], config["block_size"]))


def write_outputs(results: list[dict], ratio_lines: list[str], threads: int, results_dir: Path,
                  together: bool = False, windows: int | None = None) -> str:
    from minigpt.train import EVAL_TOKENS_CPU

    asked = BABY["eval_iters"] * BABY["batch_size"]
    windows = windows or asked

    lines = ["| run | flags | iterations | final val loss | wall time (s) | CPU time (s) | training time (s) | "
             "load at its end (1 / 5 min) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        load = " / ".join(f"{x:.1f}" for x in r["load_after"]) if r.get("load_after") else "-"
        cpu = f"{r['cpu_s']:.0f}" if r.get("cpu_s") else "-"
        lines.append(f"| {r['name']} | `{r['args']}` | {r['iters']} | {r['val_loss']:.4f} | {r['wall_s']:.0f} | "
                     f"{cpu} | {r['train_s']:.0f} | {load} |")
    lines += ["", *ratio_lines, "",
              f"torch threads: {threads} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, which the "
              f"runs inherit); {os.cpu_count()} CPUs; load average before the runs {args_load()}. "
              f"nanoGPT's validation loss is its own estimate ({BABY['eval_iters']} random batches of "
              f"{BABY['batch_size']}), minigpt's the mean over the same {windows:,} fixed windows of "
              f"{BABY['block_size']} characters in every run ("
              + ("all the split holds side by side, more would read the same characters again; " if windows < asked
                 else "") +
              "the trainer's runs: "
              f"{max(BABY['batch_size'], EVAL_TOKENS_CPU // BABY['block_size'])} windows a forward pass; the MLP's "
              "GELU is the exact one, as nanoGPT's). Wall time: from "
              "the process's start to its end (imports, tokenising, evaluations, checkpoints and all); CPU time: "
              "user + system seconds of that process (os.wait4; the same work whatever else runs, with one thread); "
              f"{'the runs of a round ran at the same time (--together); ' if together else ''}training "
              "time: the loop's own clock (nanoGPT's: its wall time). nanoGPT runs 2001 steps (iterations 0 to 2000) and evaluates both splits "
              "on 200 batches 9 times; minigpt runs 2000 and evaluates the validation split 9 times (the training "
              "loss it logs is the running mean of the steps). nanoGPT reports 1.88 in about 3 minutes on a laptop "
              "CPU."]
    table = "\n".join(lines)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "pretrain.md").write_text(table + "\n")
    (results_dir / "pretrain.json").write_text(json.dumps(results, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if "round 1" not in r["name"] and "round" in r["name"]:
            continue  # one curve per kind of run
        if len(r["curve"]) > 2:
            ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], "o-", ms=3, label=r["name"])
        else:  # evaluated only at the start and the end: a line between the two would invent a curve
            ax.plot(*r["curve"][-1], "*", ms=11, label=f"{r['name']} (end only, {r['train_s']:.0f} s)")
    ax.axhline(1.88, color="gray", ls="--", lw=1, label="nanoGPT's reported 1.88")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_ylim(top=2.6)
    ax.set_title("tinyshakespeare, char-level, baby config")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir / "pretrain_loss.png", dpi=120)
    return table


_LOAD = os.getloadavg() if hasattr(os, "getloadavg") else None


def args_load(load=_LOAD) -> str:
    return "unknown" if load is None else " / ".join(f"{x:.2f}" for x in load)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"),
                   help="path to tinyshakespeare.txt (1,115,394 bytes)")
    p.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR"),
                   help="a checkout of karpathy/nanoGPT to run side by side (default: $NANOGPT_DIR)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of the side-by-side runs (their order alternates)")
    p.add_argument("--compile", action="store_true", help="also run minigpt with --compile in each round")
    p.add_argument("--together", action="store_true", help="start the runs of a round at the same time (on a "
                   "loaded machine both then see the same load; give each one thread: OMP_NUM_THREADS=1)")
    p.add_argument("--out", default="out/bench_pretrain")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=None, help="torch threads here and in every run started "
                   "(OMP_NUM_THREADS; default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="200 iterations instead of 2000, results in --out (a smoke "
                   "check)")
    p.add_argument("--seed", type=int, default=1337, help="the seed of the same-init pair and the better defaults")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers runs")
    p.add_argument("--no-better", action="store_true", help="skip the better-defaults runs")
    p.add_argument("--profile", action="store_true", help="profile the training step instead (see above)")
    p.add_argument("--profile-steps", type=int, default=20, help="steps per profile at the baby shape")
    p.add_argument("--transformers-only", action="store_true", help=argparse.SUPPRESS)  # the .venv-ref half
    p.add_argument("--iters", type=int, default=2000, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # and the same in every run this script starts
    if args.profile:
        return profile(args)
    if not Path(args.data).is_file():
        raise SystemExit(f"{args.data} not found; give --data path/to/tinyshakespeare.txt")
    out = Path(args.out)
    if args.transformers_only:
        out.mkdir(parents=True, exist_ok=True)
        results = run_same_init_pair(args.data, out, BABY, args.iters, args.seed)
        (out / "transformers.json").write_text(json.dumps(results))
        return
    args.iters = 200 if args.quick else 2000
    results = side_by_side(args, out)
    ratio_lines = side_by_side_ratios(results)
    results_dir = out if args.quick else Path(args.results_dir)  # a smoke check keeps the real results
    windows = eval_windows(args.data, BABY)
    write_outputs(results, ratio_lines, torch.get_num_threads(), results_dir, args.together, windows)  # kept if stopped
    reference = reference_run(args, out, args.iters)
    if len(reference) == 2:
        ratio_lines.append(f"minigpt / transformers GPT-2 training time through the same loop: "
                           f"{reference[1]['train_s'] / reference[0]['train_s']:.3f} (losses {reference[0]['val_loss']:.4f}"
                           f" and {reference[1]['val_loss']:.4f})")
    results += reference
    # better defaults for less wall time: twice the batch, three times the learning rate, 60% of the iterations, and
    # one evaluation at the end instead of eight on the way; 100 batches of 24 ask for the same validation windows
    better = args.iters * 3 // 5
    if not args.no_better:
        results += [run_minigpt(f"better defaults, seed {s}", args.data, out,
                                dict(BABY, max_iters=better, lr_decay_iters=better, lr=3e-3, min_lr=3e-4, batch_size=24,
                                     warmup_iters=50, eval_interval=better, eval_iters=100, seed=s))
                    for s in (args.seed, args.seed + 1)]
    print(write_outputs(results, ratio_lines, torch.get_num_threads(), results_dir, args.together, windows))
    print(f"written to {results_dir}")


if __name__ == "__main__":
    main()
