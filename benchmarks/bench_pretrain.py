"""Pretraining benchmark: nanoGPT's documented CPU "baby" run on tinyshakespeare, with the char tokenizer.

nanoGPT's README: 4 layers, 4 heads, 128 dims, block 64, batch 12, 2000 iterations, lr 1e-3 decaying to 1e-4 over
2000 iterations, warm-up 100, dropout 0, reaches a validation loss of about 1.88 in about 3 minutes on a laptop CPU
(its command line evaluates on 20 random batches). This script runs, in order:

1. that configuration through ``python -m minigpt.train`` (evaluating on 200 fixed batches every 250 iterations),
   with --seeds seeds, so the spread between seeds is on the table;
2. when the reference environment exists (``.venv-ref``, built by ``make parity``): transformers' GPT2LMHeadModel
   and minigpt's GPT from the same initial weights, each trained by minigpt's loop on the same batches. A bug in
   minigpt's model would part the two curves; run in a second process, because the reference environment holds
   Hugging Face's ``peft``;
3. "better defaults" in less wall time, two seeds: a larger learning rate and batch, fewer iterations, one
   evaluation at the end.

    python benchmarks/bench_pretrain.py --data ../shared/data/tinyshakespeare.txt     # or: make bench-pretrain
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after site-packages: in .venv-ref, Hugging Face's peft must win over this repo's
REFERENCE_PYTHON = REPO / ".venv-ref" / "bin" / "python"

BABY = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12, "lr": 1e-3, "min_lr": 1e-4,
        "warmup_iters": 100, "eval_interval": 250, "eval_iters": 200}


def cli_args(config: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in config.items()]


def summary(name: str, args: str, rows: list[dict], wall: float) -> dict:
    vals = [r for r in rows if r.get("val_loss") is not None]
    return {"name": name, "args": args, "val_loss": vals[-1]["val_loss"], "iters": vals[-1]["iter"] + 1,
            "train_s": vals[-1]["elapsed_s"], "wall_s": wall, "curve": [(r["iter"], r["val_loss"]) for r in vals]}


def run_minigpt(name: str, data: str, out: Path, config: dict, extra: dict) -> dict:
    from minigpt.train import main as train_main

    t0 = time.perf_counter()
    rows = train_main(["--data", data, "--out-dir", str(out / name), "--no-progress", "--tokenizer", "char",
                       "--dropout", "0.0", *cli_args({**config, **extra})])
    return summary(name, " ".join(cli_args(extra)), rows, time.perf_counter() - t0)


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

        @torch.no_grad()
        def evaluate(m, loss_fn=loss_fn, cfg=cfg, val_offsets=val_offsets):
            m.eval()
            batches = window_batches(tokens.val, val_offsets, cfg.batch_size, T)
            values = [loss_fn(m, b).item() for b in batches]
            return {"val_loss": sum(values) / len(values)}

        t0 = time.perf_counter()
        rows = train(model, lambda g, cfg=cfg: random_batch(tokens.train, cfg.batch_size, T, g), loss_fn, cfg,
                     evaluate, meta={"stage": "pretrain", "model": name})
        results.append(summary(f"{name}, same initial weights and loop", f"--seed={seed}", rows,
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


def write_outputs(results: list[dict], threads: int, results_dir: Path) -> str:
    lines = ["| run | flags beyond the baby config | iterations | final val loss | training time (s) |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | `{r['args']}` | {r['iters']} | {r['val_loss']:.4f} | {r['train_s']:.0f} |")
    lines += ["", f"torch threads: {threads}; validation loss over the same 2400 fixed windows of 64 characters in "
              "every run (200 batches of 12, or 100 of 24); training time includes the evaluations on the way. "
              "nanoGPT reports 1.88 in about 3 minutes on a laptop CPU (over 20 random batches)."]
    table = "\n".join(lines)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "pretrain.md").write_text(table + "\n")
    (results_dir / "pretrain.json").write_text(json.dumps(results, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results_dir / "pretrain_loss.png", dpi=120)
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"),
                   help="path to tinyshakespeare.txt (1,115,394 bytes)")
    p.add_argument("--out", default="out/bench_pretrain")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="200 iterations instead of 2000, results in --out (a smoke "
                   "check)")
    p.add_argument("--seeds", type=int, default=1, help="seeds of the baby configuration run through minigpt")
    p.add_argument("--seed", type=int, default=1337, help="the first seed")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers run")
    p.add_argument("--transformers-only", action="store_true", help=argparse.SUPPRESS)  # the .venv-ref half
    p.add_argument("--iters", type=int, default=2000, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not Path(args.data).is_file():
        raise SystemExit(f"{args.data} not found; give --data path/to/tinyshakespeare.txt")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.transformers_only:
        out.mkdir(parents=True, exist_ok=True)
        results = run_same_init_pair(args.data, out, BABY, args.iters, args.seed)
        (out / "transformers.json").write_text(json.dumps(results))
        return
    iters = 200 if args.quick else 2000
    schedule = {"max_iters": iters, "lr_decay_iters": iters}
    results = [run_minigpt(f"minigpt, seed {s}", args.data, out, BABY, {**schedule, "seed": s})
               for s in range(args.seed, args.seed + args.seeds)]
    results += reference_run(args, out, iters)
    # better defaults for less wall time: twice the batch, three times the learning rate, 60% of the iterations, and
    # one evaluation at the end instead of eight on the way (about 20 s of the baby run's 115 s); 100 batches of 24
    # are the same 2400 validation windows as the baby run's 200 batches of 12
    better = iters * 3 // 5
    results += [run_minigpt(f"better defaults, seed {s}", args.data, out, BABY,
                            {"max_iters": better, "lr_decay_iters": better, "lr": 3e-3, "min_lr": 3e-4,
                             "batch_size": 24, "warmup_iters": 50, "eval_interval": better, "eval_iters": 100,
                             "seed": s})
                for s in (args.seed, args.seed + 1)]
    results_dir = out if args.quick else REPO / "benchmarks" / "results"  # a smoke check keeps the real results
    print(write_outputs(results, torch.get_num_threads(), results_dir))
    print(f"written to {results_dir}")


if __name__ == "__main__":
    main()
