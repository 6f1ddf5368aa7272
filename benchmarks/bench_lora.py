"""LoRA's cost, measured: training-step time, training-step memory and merged inference, on the GPT-2 (124M) shape.

    make bench-lora     (sets up .venv-ref with tests/reference/setup.sh, then runs this with its python)

Three measurements, on one random GPT-2 small (12 layers, 12 heads, 768 wide, vocabulary 50257), float32, CPU:
  (a) training step (forward, cross-entropy, backward, AdamW step) of this project's LoRA against full fine-tuning
      (ours, the goal: clearly cheaper) and against Hugging Face peft's LoRA on transformers' GPT2LMHeadModel with the
      same weights (goal: ours / HF <= 1.0), for two target choices:
        same targets   ours attn.proj, mlp.fc, mlp.proj   HF attn.c_proj, mlp.c_fc, mlp.c_proj: the same layers, so
                       the same computation (the adapter tensors are copied across and the first losses compared);
        defaults       ours query, value (the paper's choice)   HF c_attn (its GPT-2 default, fused q, k, v): not the
                       same computation, but the same number of trainable parameters (4 C r per block on both).
      All sides are timed in one loop, interleaved, the order reversed every round, so that load from other
      processes falls on all alike; medians of CPU time (time.process_time; one thread), wall time beside it.
  (b) peak memory of a training step, full fine-tuning against LoRA (ours, and HF's for comparison). Each runs in a
      fresh subprocess (this script with --memory-child) so that no other model's memory is counted: it builds the
      model, notes its resident set size (VmRSS), runs two training steps (the first creates the optimizer state),
      then reads the process's high-water mark (VmHWM, the peak resident set size). Reported: the peak, the peak
      minus the RSS of the loaded model (what training adds on top of holding the model), and an exact count of
      the bytes held in gradients and in AdamW's state after the second backward. The RSS figures include the C
      allocator's caching and are approximate (tens of MB); the tensor counts are exact. The point: LoRA keeps no
      gradient and no AdamW state (two more copies) for the frozen weights. The activations autograd saves for the
      backward pass are counted exactly too (saved_tensors_hooks): they hardly shrink, since the backward pass still
      runs through every frozen layer.
  (c) inference: a forward pass of a merged LoRA model (peft.merge) against the base model, interleaved (goal: no
      measurable overhead: merging folds B A into W, so the very same matmuls run); the unmerged model is timed too,
      and greedy generation with the KV cache, base against merged.
The markdown report goes to stdout and to benchmarks/results/lora.md.

Two packages named ``peft``. transformers and Hugging Face's peft live only in .venv-ref, so this script runs with
.venv-ref/bin/python. ``import peft`` gives Hugging Face's package (the repo root is appended to the END of sys.path,
after site-packages); this project's package is loaded under the name ``minipeft`` with
importlib (spec_from_file_location with submodule_search_locations = the peft/ folder). Its modules import each
other only relatively (``from .lora import ...``), so they all resolve inside ``minipeft`` and never touch
``sys.modules["peft"]``; minigpt does not import peft at all (checked at start-up and at the end). This lets both
libraries be timed in one process, interleaved, which is fairer than alternating processes.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after site-packages: `import peft` must find Hugging Face's
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally: never reach for the model hub

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, GPT2Config

import peft as hf_peft
from minigpt import GPT, PRESETS, GPTConfig


def load_minipeft():
    """This project's peft package, imported under the name ``minipeft`` next to Hugging Face's ``peft``."""
    if "site-packages" not in str(getattr(hf_peft, "__file__", "")) or not hasattr(hf_peft, "__version__"):
        raise ImportError(f"`import peft` found {hf_peft.__file__}, not Hugging Face's peft: run with .venv-ref")
    folder = REPO / "peft"
    spec = importlib.util.spec_from_file_location("minipeft", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["minipeft"] = module
    spec.loader.exec_module(module)
    if sys.modules["peft"] is not hf_peft or not module.lora.__name__.startswith("minipeft."):
        raise ImportError("loading this project's peft as minipeft disturbed the `peft` module")
    return module


minipeft = load_minipeft()

SHAPE = {k: PRESETS["gpt2"][k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")}  # 124M
TARGETS = {  # name: (ours, HF's)
    "same targets": (["attn.proj", "mlp.fc", "mlp.proj"], ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "defaults": (["query", "value"], ["c_attn"]),
}
SAME_NAMES = {"attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


# ----------------------------------------------------------------------------------------------------------
# Models


def hf_config() -> GPT2Config:
    return GPT2Config(vocab_size=SHAPE["vocab_size"], n_positions=SHAPE["block_size"], n_layer=SHAPE["n_layer"],
                      n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"], resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)


def make_pair(seed: int = 0):
    """The same random GPT-2 weights as a minigpt GPT and a transformers GPT2LMHeadModel (SDPA attention)."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(hf_config(), attn_implementation="sdpa", dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = GPT.from_pretrained(d)
    return ours, hf


def ours_lora(model, targets, r, alpha):
    return minipeft.get_peft_model(model, minipeft.LoraConfig(r=r, alpha=alpha, target_modules=targets))


def hf_lora(model, targets, r, alpha):
    config = hf_peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=True,
                                task_type="CAUSAL_LM")
    return hf_peft.get_peft_model(model, config)


def copy_same_targets(ours, hf, seed=1):
    """Give both sides' LoRA layers (same targets) the same A and the same non-zero B, so their losses must agree."""
    g = torch.Generator().manual_seed(seed)
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for i, block in enumerate(ours.encoder.blocks):
            for mine, theirs in SAME_NAMES.items():
                layer = block.get_submodule(mine)
                layer.lora_B.copy_(0.01 * torch.randn(layer.lora_B.shape, generator=g))
                for ab in "AB":
                    hf_params[f"base_model.model.transformer.h.{i}.{theirs}.lora_{ab}.default.weight"].copy_(
                        getattr(layer, f"lora_{ab}"))


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------
# (a) training step


class Trainer:
    """One training step of a model: zero the grads, forward, cross-entropy, backward, AdamW step."""

    def __init__(self, model, logits_of, x, y, lr=1e-5):
        self.model, self.logits_of, self.x, self.y = model.train(), logits_of, x, y
        self.optimizer = torch.optim.AdamW(trainable(model), lr=lr)

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.logits_of(self.model, self.x)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), self.y.reshape(-1))
        loss.backward()
        self.optimizer.step()
        return loss.item()


def ours_logits(model, idx):
    return model(idx)[0]


def hf_logits(model, idx):
    return model(input_ids=idx).logits


def batch(args, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.block), generator=g)  # (B, T)
    y = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.block), generator=g)  # (B, T)
    return x, y


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """(median CPU seconds, median wall seconds) per call of each function, called in turn, the order reversed
    every other round. CPU time (time.process_time) is the headline: with one thread it counts only the time this
    process ran, so it is much less disturbed than wall time by other processes sharing the cores."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cpu, wall = {name: [] for name in fns}, {name: [] for name in fns}
    order = list(fns)
    for i in range(repeats):
        for name in order if i % 2 == 0 else order[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in fns}


def bench_train(args):
    x, y = batch(args)
    steps, notes = {}, {}
    full, _ = make_pair()
    steps["full"] = Trainer(full, ours_logits, x, y)
    for name, (ours_targets, hf_targets) in TARGETS.items():
        ours, hf = make_pair()
        ours, hf = ours_lora(ours, ours_targets, args.r, args.alpha), hf_lora(hf, hf_targets, args.r, args.alpha)
        counts = (sum(p.numel() for p in trainable(ours)), sum(p.numel() for p in trainable(hf)))
        if name == "same targets":
            copy_same_targets(ours, hf)
        steps[f"ours {name}"] = Trainer(ours, ours_logits, x, y)
        steps[f"hf {name}"] = Trainer(hf, hf_logits, x, y)
        first = (steps[f"ours {name}"](), steps[f"hf {name}"]())  # also a warm-up step
        same = abs(first[0] - first[1]) < 1e-4
        notes[name] = (f"trainable {counts[0]:,} vs {counts[1]:,}"
                       + ("; first loss " + ("same" if same else f"DIFFERS {first[0]:.5f} vs {first[1]:.5f}")
                          if name == "same targets" else ""))
    notes["full"] = f"trainable {sum(p.numel() for p in trainable(full)):,}"
    t = interleaved(steps, args.repeats, warmup=1)
    shape = f"B={args.batch} T={args.block}, r={args.r}"
    rows = [
        row(f"train step: LoRA (same targets) vs full fine-tuning, ours, {shape}", t["ours same targets"], t["full"],
            "LoRA / full < 1", f"{notes['same targets'].split(';')[0].split(' vs')[0]} vs {notes['full']}"),
        row(f"train step: LoRA (q, v) vs full fine-tuning, ours, {shape}", t["ours defaults"], t["full"],
            "LoRA / full < 1", ""),
        row(f"train step: LoRA vs HF peft LoRA, same targets (proj, fc / c_proj, c_fc), {shape}",
            t["ours same targets"], t["hf same targets"], "ours / HF <= 1.0", notes["same targets"]),
        row(f"train step: LoRA vs HF peft LoRA, defaults (q, v / c_attn), {shape}", t["ours defaults"],
            t["hf defaults"], "ours / HF <= 1.0", notes["defaults"]),
    ]
    return rows


# ----------------------------------------------------------------------------------------------------------
# (b) memory of a training step, each in a fresh process


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def saved_for_backward(model, logits_of, x, y) -> int:
    """Bytes of the activations autograd keeps for the backward pass of one forward + loss: every tensor it saves,
    counted once per storage, parameters excluded (an exact count, unlike the RSS)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = logits_of(model, x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    del logits, loss
    return sum(storages.values())


def memory_child(mode: str, args) -> dict:
    """Build the model for mode ("full", "lora", "hf_lora"), run two training steps, report memory (in this
    process, started fresh for this one measurement)."""
    torch.manual_seed(0)
    ours_targets, hf_targets = TARGETS["same targets"]
    if mode == "hf_lora":
        hf = AutoModelForCausalLM.from_config(hf_config(), attn_implementation="sdpa", dtype=torch.float32)
        model = hf_lora(hf, hf_targets, args.r, args.alpha)
        logits_of = hf_logits
    else:
        model = GPT(GPTConfig(**SHAPE))
        if mode == "lora":
            model = ours_lora(model, ours_targets, args.r, args.alpha)
        logits_of = ours_logits
    gc.collect()
    rss_model = proc_status_kb("VmRSS")
    x, y = batch(args)
    step = Trainer(model, logits_of, x, y)
    step()  # creates AdamW's state
    step.optimizer.zero_grad(set_to_none=True)
    logits = logits_of(model, x)
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
    del logits
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in step.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    step.optimizer.step()
    peak = proc_status_kb("VmHWM")
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}  # tied weights once
    return {"mode": mode, "rss_model_mb": rss_model / 1024, "peak_mb": peak / 1024,
            "saved_mb": saved_for_backward(model, logits_of, x, y) / 2**20,
            "grads_mb": grads / 2**20, "optimizer_mb": state / 2**20, "params_mb": sum(params.values()) / 2**20,
            "trainable": sum(p.numel() for p in trainable(model))}


def bench_memory(args):
    results = []
    for mode in ("full", "lora", "hf_lora"):
        cmd = [sys.executable, __file__, "--memory-child", mode, "--batch", str(args.batch), "--block",
               str(args.block), "--r", str(args.r), "--alpha", str(args.alpha), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {mode} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  memory {mode}: peak {results[-1]['peak_mb']:.0f} MB", file=sys.stderr)
    return results


# ----------------------------------------------------------------------------------------------------------
# (c) inference: merged LoRA against the base model


def bench_inference(args):
    base, _ = make_pair()
    merged, _ = make_pair()
    unmerged, _ = make_pair()
    targets = ["query", "key", "value", "proj", "fc"]  # every Linear of every block
    for m in (merged, unmerged):
        torch.manual_seed(1)  # the same A in both
        ours_lora(m, targets, args.r, args.alpha)
        g = torch.Generator().manual_seed(2)  # the same non-zero B in both
        with torch.no_grad():
            for layer in minipeft.lora.lora_layers(m):
                layer.lora_B.copy_(0.01 * torch.randn(layer.lora_B.shape, generator=g))
    minipeft.merge(merged)
    for m in (base, merged, unmerged):
        m.eval()
    x, _ = batch(args, seed=3)
    with torch.no_grad():
        same = (merged(x)[0] - unmerged(x)[0]).abs().max().item()

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    t = interleaved({"base": forward(base), "merged": forward(merged), "unmerged": forward(unmerged)},
                    args.inference_repeats)
    prompt = x[:1, :16]  # (1, 16)

    def generate(m):
        return lambda: m.generate(prompt, args.new_tokens, temperature=0, use_cache=True)

    tg = interleaved({"base": generate(base), "merged": generate(merged)}, args.gen_repeats)
    shape = f"B={args.batch} T={args.block}, LoRA r={args.r} on every Linear of every block"
    n = args.new_tokens
    return [
        row(f"forward: merged LoRA vs base model, {shape}", t["merged"], t["base"], "merged / base ~ 1.0",
            f"merged vs unmerged logits differ by {same:.1e}"),
        row(f"forward: unmerged LoRA vs base model, {shape}", t["unmerged"], t["base"], "(for reference)",
            "the low-rank branch run beside W"),
        row(f"generate {n} tokens, KV cache, batch 1: merged LoRA vs base", tg["merged"], tg["base"],
            "merged / base ~ 1.0", f"{n / tg['merged'][0]:.1f} vs {n / tg['base'][0]:.1f} tokens/s (CPU time)"),
    ]


# ----------------------------------------------------------------------------------------------------------
# Report


def row(what, ours, ref, goal, note):
    """ours, ref: (CPU seconds, wall seconds) medians."""
    return {"what": what, "ours_ms": 1e3 * ours[0], "ref_ms": 1e3 * ref[0], "ratio": ours[0] / ref[0],
            "wall_ratio": ours[1] / ref[1], "goal": goal, "note": note}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(train_rows, memory, inference_rows, args) -> str:
    setup = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, Hugging Face peft "
        f"{hf_peft.__version__}, {args.threads} thread(s) (torch.set_num_threads), {cpu_name()}, Python "
        f"{platform.python_version()}. Model: random GPT-2 small (12 layers, 12 heads, 768 wide, vocabulary 50257, "
        "block 1024, 124M parameters), float32, SDPA attention, dropout 0, the same weights on both sides. "
        f"LoRA r={args.r}, alpha={args.alpha:g}. A training step is forward + cross-entropy + backward + AdamW step."
    )
    timing = (
        "Times are medians of interleaved runs (the sides called in turn, the order reversed every round; "
        f"{args.repeats} training steps, {args.inference_repeats} forward passes, {args.gen_repeats} generations "
        "per side) of the process's CPU time (time.process_time): with one thread that counts only the time this "
        "process ran, so other processes sharing the cores disturb it far less than wall time; the wall-clock "
        "ratio is shown beside it."
    )
    legend = (
        "Reference column: full fine-tuning (ours) in the first two rows, Hugging Face peft's LoRA on transformers' "
        "GPT2LMHeadModel in the next two, the base model (no LoRA) in the inference rows. 'same targets': ours "
        "attn.proj, mlp.fc, mlp.proj, HF attn.c_proj, mlp.c_fc, mlp.c_proj: the same layers, given the same A and "
        "B (the first losses agree). 'defaults': ours query, value (separate Linear layers, the paper's choice), "
        "HF c_attn (GPT-2's fused q, k, v Conv1D, HF's default target): a different computation with the same "
        "number of trainable parameters (4 C r per block). Inference: LoRA on every Linear of every block (query, "
        "key, value, attn.proj, mlp.fc, mlp.proj) with a non-zero B; 'merged' is after peft.merge, which folds "
        "scaling B A into W."
    )
    lines = [
        "# LoRA: training step, memory and merged inference (GPT-2 small shape, CPU)",
        "",
        setup,
        "",
        "## Time",
        "",
        timing,
        "",
        "| measurement | ours ms | reference ms | ratio | wall-clock ratio | goal | note |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in train_rows + inference_rows:
        lines.append(f"| {r['what']} | {r['ours_ms']:.1f} | {r['ref_ms']:.1f} | {r['ratio']:.2f} | "
                     f"{r['wall_ratio']:.2f} | {r['goal']} | {r['note']} |")
    lines += ["", legend]
    if memory:
        lines += memory_table(memory, args)
    return "\n".join(lines) + "\n"


def memory_table(memory, args) -> list[str]:
    lines = [
        "",
        f"## Memory of a training step (B={args.batch}, T={args.block}), each in a fresh process",
        "",
        ("| fine-tuning | trainable parameters | peak RSS MB | peak minus loaded model MB | gradients MB "
         "| AdamW state MB | saved for backward MB |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"full": "full fine-tuning (ours)", "lora": "LoRA, same targets (ours)",
             "hf_lora": "LoRA, same targets (HF peft)"}
    for m in memory:
        lines.append(f"| {names[m['mode']]} | {m['trainable']:,} | {m['peak_mb']:.0f} | "
                     f"{m['peak_mb'] - m['rss_model_mb']:.0f} | {m['grads_mb']:.1f} | {m['optimizer_mb']:.1f} | "
                     f"{m['saved_mb']:.0f} |")
    full, lora = memory[0], memory[1]
    added = (lora["peak_mb"] - lora["rss_model_mb"]) / (full["peak_mb"] - full["rss_model_mb"])
    summary = (
        f"LoRA / full fine-tuning: peak RSS {lora['peak_mb'] / full['peak_mb']:.2f}, memory a training step adds "
        f"to the loaded model {added:.2f}. The parameters take {full['params_mb']:.0f} MB (the tied head counted "
        f"once). Full fine-tuning adds a gradient for every weight ({full['grads_mb']:.0f} MB) and AdamW's two "
        f"moments ({full['optimizer_mb']:.0f} MB); LoRA keeps those only for A and B ({lora['grads_mb']:.1f} + "
        f"{lora['optimizer_mb']:.1f} MB). The activations saved for the backward pass hardly change "
        f"({full['saved_mb']:.0f} vs {lora['saved_mb']:.0f} MB): the gradient still flows back through every "
        "frozen layer to reach the adapters below it."
    )
    method = (
        "How it is measured. Peak RSS is the process's high-water mark (VmHWM in /proc/self/status) after two "
        "training steps, each row in a fresh process (model built, its RSS noted, two steps run: the first creates "
        "AdamW's state, so the second is a steady-state step). It includes the interpreter and the libraries (every "
        "row imports the same ones) and whatever the C allocator caches, so it is approximate to some tens of MB; "
        "'peak minus loaded model' subtracts the RSS noted after the model was built. Gradients and AdamW state "
        "are exact byte counts of the tensors held after the second backward; 'saved for backward' is the exact "
        "size of what autograd keeps from one forward pass and loss (torch.autograd.graph.saved_tensors_hooks, "
        "each storage once, parameters excluded)."
    )
    return lines + ["", summary, "", method]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier on a shared CPU)")
    p.add_argument("--batch", type=int, default=4, help="batch size (training, memory, forward)")
    p.add_argument("--block", type=int, default=128, help="sequence length")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--repeats", type=int, default=7, help="training steps timed per side")
    p.add_argument("--inference-repeats", type=int, default=10, help="forward passes timed per side")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the generation row")
    p.add_argument("--gen-repeats", type=int, default=3, help="generations timed per side")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train, memory, inference")
    p.add_argument("--memory-child", choices=("full", "lora", "hf_lora"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lora.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return
    skip = set(filter(None, args.skip.split(",")))

    memory = bench_memory(args) if "memory" not in skip else []  # first, while this process is still small
    train_rows = bench_train(args) if "train" not in skip else []
    for r in train_rows:
        print(f"  {r['what']}: ratio {r['ratio']:.2f}", file=sys.stderr)
    gc.collect()
    inference_rows = bench_inference(args) if "inference" not in skip else []
    for r in inference_rows:
        print(f"  {r['what']}: ratio {r['ratio']:.2f}", file=sys.stderr)

    if sys.modules.get("peft") is not hf_peft:
        raise RuntimeError("`peft` no longer names Hugging Face's package: something imported this project's peft")
    text = report(train_rows, memory, inference_rows, args)
    print(text)
    if not skip:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
