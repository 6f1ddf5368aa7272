"""Supervised fine-tuning with all weights or one PEFT method: the command line over minigpt.sft.

    python -m peft.train --method lora --base out/pretrain --out-dir out/sft/lora
    python -m peft.train --method full --base out/pretrain
    python -m peft.train --method lora --base path/to/gpt2      # a Hugging Face GPT-2 folder works as the base

Data: the built-in instruction set by default, or Alpaca-layout JSONL files (--train-file / --test-file with
instruction, optional input, output). Writes to --out-dir a model folder that minigpt.checkpoint.load opens (the
whole model for --method full, the adapter and the base's path for a PEFT method), with metrics.jsonl, loss.png and
results.json. The options of each method are listed under "method options"; an option the chosen method does not
have is an error.
"""

from __future__ import annotations

import argparse
import dataclasses

import peft
from minigpt import sft
from minigpt.files import write_json
from minigpt.options import HelpFormatter, add_options, default_of, from_args, parse, run
from minigpt.train import TrainConfig, train_config_from

SFT_DEFAULTS = {"max_iters": 600, "batch_size": 32, "lr": None, "min_lr": None, "warmup_iters": 30,
                "weight_decay": 0.0, "eval_interval": 200, "eval_iters": 1, "out_dir": None}


def add_method_options(group) -> list[str]:
    """A flag for every option of every PEFT method (methods that share a name share the flag), absent from the
    parsed args unless given; the help lists each method's default. Returns the option names."""
    defaults = {}  # name -> ["lora: 8", "adapter: 16", ...]
    for method, cls in peft.CONFIGS.items():
        for f in dataclasses.fields(cls):
            value = default_of(f)
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            defaults.setdefault(f.name, []).append(f"{method} {shown}")
    names = []
    for cls in peft.CONFIGS.values():
        new = [f.name for f in dataclasses.fields(cls) if f.name not in names]
        add_options(group, cls, skip=set(names), prefix="method_", defaults=dict.fromkeys(new, argparse.SUPPRESS),
                    helps={n: f"{f.metadata['help']} (default: {'; '.join(defaults[n])})"
                           for f in dataclasses.fields(cls) for n in [f.name] if n in new})
        names += new
    return names


def given_method_options(args) -> dict:
    """The method options given on the command line, by name (add_method_options leaves the others out of args)."""
    return {k.removeprefix("method_"): v for k, v in vars(args).items() if k.startswith("method_")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peft.train", description=__doc__, formatter_class=HelpFormatter)
    add_options(p.add_argument_group("what to fine-tune, on what"), sft.SFTConfig)
    add_method_options(p.add_argument_group("method options"))
    lr = ", ".join(f"{m} {v:g}" for m, v in sft.DEFAULT_LR.items())
    add_options(p.add_argument_group(f"training (--lr by default: {lr}; --min-lr by default lr / 10; --out-dir by "
                                     "default out/sft/METHOD)"), TrainConfig, defaults=SFT_DEFAULTS,
                skip=("save_trainable_only",))
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parse(parser, argv)
    scfg = from_args(sft.SFTConfig, args)
    try:
        config = sft.method_config(scfg.method, **given_method_options(args))
    except ValueError as e:
        parser.error(str(e))
    lr = args.lr or sft.DEFAULT_LR[scfg.method]
    cfg = train_config_from(parser, args, lr=lr, min_lr=args.min_lr if args.min_lr is not None else lr / 10,
                            out_dir=args.out_dir or f"out/sft/{scfg.method}")
    results = sft.run_sft(scfg, cfg, config)
    write_json(f"{cfg.out_dir}/results.json", results)
    before = results["before"]
    print(f"{scfg.method}: accuracy {before['accuracy']:.1%} -> {results['accuracy']:.1%}, answer loss "
          f"{before['answer_loss']:.3f} -> {results['answer_loss']:.3f}, {results['trainable_params']:,} trainable "
          f"of {results['total_params']:,} parameters; saved {results['saved']}")
    return results


if __name__ == "__main__":
    run(main)
