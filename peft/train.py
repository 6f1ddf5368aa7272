"""Supervised fine-tuning with all weights or one PEFT method, through the one training loop.

    python -m peft.train --method lora --base out/pretrain/best.pt --out-dir out/sft/lora
    python -m peft.train --method full --base out/pretrain/best.pt

Data: the built-in instruction set (tasks.sft_examples) by default, or Alpaca-layout JSONL files
(--train-file / --test-file with instruction, optional input, output). Writes to --out-dir: metrics.jsonl, loss.png,
results.json, and the fine-tuned model: model.pt (full fine-tuning) or adapter.safetensors (a PEFT method; it
holds only the trained tensors), loadable with load_finetuned(out_dir).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

import peft
from minigpt import sft, tasks
from minigpt.tokenizer import tokenizer_from_dict
from minigpt.train import TrainConfig, load_checkpoint, model_from_checkpoint, save_checkpoint, train

METHODS = ["full", *peft.CONFIGS]
# learning rates that work on the built-in task (see benchmarks/bench_peft.py for the sweep): methods with few
# parameters far from the loss surface's sharp directions take larger steps; virtual tokens the largest
DEFAULT_LR = {"full": 1e-3, "bitfit": 1e-2, "lora": 1e-2, "ia3": 3e-2, "adapter": 1e-2, "prompt_tuning": 0.3,
              "p_tuning": 0.1, "prefix_tuning": 1e-2, "p_tuning_v2": 0.1}

# command-line flag -> config field, applied to every method whose config has that field
METHOD_FLAGS = {
    "r": int, "alpha": float, "target_modules": str, "num_virtual_tokens": int, "reduction_factor": int,
    "prefix_projection": int, "encoder_type": str,
}


def method_config(method: str, **flags):
    """The PEFT config for method with the given flag values (None: the config's default); None for "full"."""
    if method == "full":
        return None
    if method not in peft.CONFIGS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    cls = peft.CONFIGS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for k, v in flags.items():
        if v is None or k not in names:
            continue
        if k == "target_modules":
            v = v.split(",")
        if k == "prefix_projection" and isinstance(getattr(cls(), k), bool):
            v = bool(v)
        values[k] = v
    return cls(**values)


def load_base(path):
    """(model, tokenizer) from a checkpoint written by minigpt.train or by full fine-tuning."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt), tokenizer_from_dict(ckpt["tokenizer"])


def finetune(model, tokenizer, train_examples, test_examples, config, cfg: TrainConfig, eval_examples: int = 200):
    """Fine-tune model (in place; patched with config unless it is None) and return the final metrics."""
    if config is not None:
        peft.get_peft_model(model, config)
        cfg = dataclasses.replace(cfg, save_trainable_only=True)
    model.check_tokenizer(tokenizer)
    block = model.config.block_size - getattr(model.input_layer, "num_virtual_tokens", 0)
    train_set = sft.encode_dataset(tokenizer, train_examples, block)
    test_examples = test_examples[:eval_examples]
    test_set = sft.encode_dataset(tokenizer, test_examples, block)
    pad = tokenizer.pad_token_id

    def get_batch(generator):
        return sft.random_batch(train_set, cfg.batch_size, pad, generator)

    def loss_fn(m, batch):
        return m(batch[0], batch[1])[1]

    def evaluate(m):
        metrics = sft.evaluate(m, tokenizer, test_examples, test_set)
        return {"val_loss": metrics["answer_loss"], "accuracy": metrics["accuracy"]}

    trainable, total = peft.count_parameters(model)
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "stage": "sft",
            "method": "full" if config is None else config.method}
    rows = train(model, get_batch, loss_fn, cfg, evaluate, meta=meta)
    final = [r for r in rows if r.get("val_loss") is not None][-1]
    return {"method": meta["method"], "trainable_params": trainable, "total_params": total,
            "answer_loss": final["val_loss"], "accuracy": final["accuracy"], "train_s": final["elapsed_s"],
            "iters": final["iter"] + 1}


def save_finetuned(model, tokenizer, out_dir, base_path) -> Path:
    """model.pt for full fine-tuning; adapter.safetensors + finetune.json (naming the base) for a PEFT method."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "peft_config", None)
    if config is None:
        save_checkpoint(out_dir / "model.pt", {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                               "tokenizer": tokenizer.to_dict(), "stage": "sft"})
        return out_dir / "model.pt"
    peft.save_adapter(model, out_dir / "adapter.safetensors")
    info = {"method": config.method, "base": str(Path(base_path).resolve())}
    tmp = out_dir / "finetune.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, out_dir / "finetune.json")
    return out_dir / "adapter.safetensors"


def load_finetuned(out_dir):
    """(model, tokenizer) saved by save_finetuned: the full model, or the base with its adapter applied."""
    out_dir = Path(out_dir)
    if (out_dir / "model.pt").is_file():
        return load_base(out_dir / "model.pt")
    if not (out_dir / "finetune.json").is_file():
        raise FileNotFoundError(f"{out_dir} holds neither model.pt nor adapter.safetensors + finetune.json")
    info = json.loads((out_dir / "finetune.json").read_text())
    model, tokenizer = load_base(info["base"])
    peft.load_adapter(model, out_dir / "adapter.safetensors")
    return model, tokenizer


def build_parser():
    p = argparse.ArgumentParser(prog="python -m peft.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lora", choices=METHODS)
    p.add_argument("--base", default="out/pretrain/best.pt", help="pretrained checkpoint (python -m minigpt.train)")
    p.add_argument("--out-dir", default=None, help="default: out/sft/METHOD")
    p.add_argument("--train-file", help="Alpaca-layout JSONL for training (default: the built-in instruction set)")
    p.add_argument("--test-file", help="Alpaca-layout JSONL for evaluation (default: the built-in held-out set)")
    p.add_argument("--eval-examples", type=int, default=200, help="held-out examples used for accuracy")
    g = p.add_argument_group("method options (used by the methods that have them)")
    g.add_argument("--r", type=int, help="LoRA rank")
    g.add_argument("--alpha", type=float, help="LoRA alpha (scaling = alpha / r)")
    g.add_argument("--target-modules", help="comma-separated module names, e.g. query,value")
    g.add_argument("--num-virtual-tokens", type=int, help="prompt methods: number of virtual tokens")
    g.add_argument("--reduction-factor", type=int, help="adapters: d / bottleneck size")
    g.add_argument("--prefix-projection", type=int, help="prefix-tuning: hidden size of the reparameterisation")
    g.add_argument("--encoder-type", help="p-tuning: lstm or mlp")
    g = p.add_argument_group("training")
    g.add_argument("--max-iters", type=int, default=600)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=None, help=f"default per method: {DEFAULT_LR}")
    g.add_argument("--warmup-iters", type=int, default=30)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--eval-interval", type=int, default=200)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--device", default="auto")
    g.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir or f"out/sft/{args.method}")
    config = method_config(args.method, **{k: getattr(args, k) for k in METHOD_FLAGS})
    if not Path(args.base).is_file():
        raise SystemExit(f"base checkpoint {args.base!r} not found; pretrain one first: python -m minigpt.train")
    model, tokenizer = load_base(args.base)
    if args.train_file:
        train_examples = tasks.read_jsonl(args.train_file)
        test_examples = tasks.read_jsonl(args.test_file) if args.test_file else train_examples[-args.eval_examples:]
    else:
        train_examples, test_examples = tasks.sft_examples()
    lr = args.lr or DEFAULT_LR[args.method]
    cfg = TrainConfig(max_iters=args.max_iters, batch_size=args.batch_size, lr=lr, min_lr=lr / 10,
                      warmup_iters=args.warmup_iters, weight_decay=args.weight_decay, eval_interval=args.eval_interval,
                      eval_iters=1, out_dir=str(out_dir), seed=args.seed, device=args.device,
                      progress=not args.no_progress)
    torch.manual_seed(args.seed)
    before = sft.evaluate(model, tokenizer, test_examples[: args.eval_examples])
    results = finetune(model, tokenizer, train_examples, test_examples, config, cfg, args.eval_examples)
    results["before"] = before
    results["saved"] = str(save_finetuned(model.cpu(), tokenizer, out_dir, args.base))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{args.method}: accuracy {before['accuracy']:.1%} -> {results['accuracy']:.1%}, answer loss "
          f"{before['answer_loss']:.3f} -> {results['answer_loss']:.3f}, {results['trainable_params']:,} trainable "
          f"of {results['total_params']:,} parameters; saved {results['saved']}")
    return results


if __name__ == "__main__":
    main()
