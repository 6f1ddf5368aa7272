"""The training loop: schedule, optimizer groups, accumulation, checkpoints, resume, NaN, data on disk, DDP."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import minigpt.train as train_mod
from minigpt import GPT, GPTConfig, checkpoint, preset
from minigpt.checkpoint import load_checkpoint, save_checkpoint
from minigpt.data import TokenData, fixed_windows, prepare, random_batch
from minigpt.train import TrainConfig, lr_at, param_groups, train

ROOT = Path(__file__).resolve().parents[1]
TEXT = "".join(f"{a} plus {b} makes {a + b}. The cat sat on mat number {a}.\n" for a in range(40) for b in range(8))


def test_lr_schedule_matches_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert lr_at(0, cfg) == pytest.approx(1e-3 * 1 / 11)  # warm-up: lr * (it + 1) / (warmup + 1)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at lr
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cos(pi/2) = 0
    assert lr_at(85, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.75)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(199, cfg) == pytest.approx(1e-4)


def test_weight_decay_only_on_linear_weight_matrices():
    model = GPT(preset("tiny", vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {n for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2 and "wte" not in n
                and "wpe" not in n}
    assert decayed == expected and len(expected) == 2 * 6  # q, k, v, proj, fc, mlp.proj per block
    assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - expected
    with_emb = {names[id(p)] for p in param_groups(model, 0.1, decay_embeddings=True)[0]["params"]}
    assert with_emb == expected | {"input_layer.wte.weight", "input_layer.wpe.weight"}


def _tiny_run(tmp_path, name, **overrides):
    """Train a tiny GPT on fixed synthetic tokens with the real loop; returns (model, rows)."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=40, dropout=0.1))
    tokens = np.random.default_rng(0).integers(0, 40, 5000).astype(np.uint16)
    kw = dict(max_iters=6, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_iters=2, eval_interval=3, eval_iters=2,
              log_interval=1, out_dir=str(tmp_path / name), progress=False, plot=False)
    cfg = TrainConfig(**{**kw, **overrides})

    def evaluate(m):
        m.eval()
        x, y = random_batch(tokens, 4, 32, torch.Generator().manual_seed(5))
        with torch.no_grad():
            return {"val_loss": m(x, y)[1].item()}

    rows = train(model, lambda g: random_batch(tokens, cfg.batch_size, 32, g), lambda m, b: m(*b)[1], cfg, evaluate,
                 meta={"model_config": model.config.to_dict()})
    return model, rows


def test_gradient_accumulation_equals_one_larger_batch(tmp_path, monkeypatch):
    # SGD makes the parameter change proportional to the gradient, so equal parameters mean equal gradients
    monkeypatch.setattr(train_mod, "configure_optimizer",
                        lambda model, cfg, device_type: torch.optim.SGD(model.parameters(), lr=cfg.lr))
    data = torch.randint(0, 40, (8, 33), generator=torch.Generator().manual_seed(1))
    seeds = {}

    def get_batch(g):  # micro-batch k of the accumulated run gets rows 4k..4k+3; the big batch gets all 8
        k = seeds.setdefault(g.initial_seed(), len(seeds))
        rows = data if big else data[4 * k : 4 * k + 4]
        return rows[:, :-1], rows[:, 1:]

    results = []
    for big, accum in ((True, 1), (False, 2)):
        seeds.clear()
        torch.manual_seed(0)
        model = GPT(preset("tiny", vocab_size=40))
        cfg = TrainConfig(max_iters=1, batch_size=8 if big else 4, gradient_accumulation_steps=accum, lr=0.5,
                          min_lr=0.5, warmup_iters=0, grad_clip=0, out_dir=str(tmp_path / str(accum)),
                          progress=False, plot=False)
        train(model, get_batch, lambda m, b: m(*b)[1], cfg)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_resume_gives_the_same_loss_curve(tmp_path):
    _, full = _tiny_run(tmp_path, "full", max_iters=12, lr_decay_iters=12)
    _tiny_run(tmp_path, "split", max_iters=7, lr_decay_iters=12)  # stops after iteration 6 (a checkpoint)
    ckpt = load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert ckpt["iter"] == 6
    torch.manual_seed(123)  # whatever the RNG state now, resume restores the saved one
    model = GPT(preset("tiny", vocab_size=40, dropout=0.1))
    tokens = np.random.default_rng(0).integers(0, 40, 5000).astype(np.uint16)
    cfg = TrainConfig(max_iters=12, lr_decay_iters=12, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_iters=2,
                      eval_interval=3, eval_iters=2, log_interval=1, out_dir=str(tmp_path / "split"),
                      progress=False, plot=False)
    train(model, lambda g: random_batch(tokens, 4, 32, g), lambda m, b: m(*b)[1], cfg, resume=ckpt)
    resumed = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in resumed] == list(range(12))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]  # exactly, on CPU


def test_resume_refuses_a_checkpoint_of_another_model_even_when_the_weights_fit(tmp_path):
    _tiny_run(tmp_path, "run", max_iters=4)  # GPT-2's tanh GELU, the GPTConfig default
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    other = GPT(preset("tiny", vocab_size=40, dropout=0.1, activation="gelu"))  # the same shapes, the other GELU
    cfg = TrainConfig(max_iters=8, batch_size=4, out_dir=str(tmp_path / "run"), progress=False, plot=False)
    tokens = np.random.default_rng(0).integers(0, 40, 5000).astype(np.uint16)
    with pytest.raises(ValueError, match=r"another model.*'activation': \('gelu', 'gelu_tanh'\)"):
        train(other, lambda g: random_batch(tokens, 4, 32, g), lambda m, b: m(*b)[1], cfg,
              meta={"model_config": other.config.to_dict()}, resume=ckpt)


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    model = GPT(preset("tiny", vocab_size=40))
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = m(*batch)[1]
        return loss * float("nan") if calls["n"] == 5 else loss

    cfg = TrainConfig(max_iters=10, batch_size=2, eval_interval=2, out_dir=str(tmp_path), progress=False, plot=False)
    tokens = np.arange(1000, dtype=np.uint16) % 40
    with pytest.raises(FloatingPointError, match="at iteration 4"):
        train(model, lambda g: random_batch(tokens, 2, 16, g), loss_fn, cfg, lambda m: {"val_loss": 1.0})
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 2


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"iter": 1, "w": torch.ones(3)})

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iter": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["iter"] == 1


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    torch.save({"model": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.pt")


# -- data on disk ---------------------------------------------------------------------------------------------


def test_memmap_round_trip_and_reuse(tmp_path):
    docs = [TEXT[:3000], TEXT[3000:6000]]
    data = prepare(docs, tmp_path / "d", "char")
    tok = data.tokenizer
    expected = tok.encode(docs[0]) + [tok.eos_token_id] + tok.encode(docs[1]) + [tok.eos_token_id]
    assert data.tokens.dtype == np.uint16 and data.tokens.tolist() == expected
    assert len(data.val) == int(0.1 * len(expected)) and data.val.tolist() == expected[-len(data.val):]
    mtime = (tmp_path / "d" / "tokens.bin").stat().st_mtime_ns
    again = prepare(docs, tmp_path / "d", "char")  # reused, not rewritten
    assert (tmp_path / "d" / "tokens.bin").stat().st_mtime_ns == mtime and again.tokens.tolist() == expected
    with pytest.raises(ValueError, match="holds tokens made with tokenizer"):
        prepare(docs, tmp_path / "d", "bpe")


def test_too_short_data_names_the_counts(tmp_path):
    data = prepare(["abcdefghij" * 5], tmp_path / "d", "char")
    with pytest.raises(ValueError, match=r"validation split has 5 tokens, fewer than block_size \+ 1 = 33"):
        data.check_length(32)
    with pytest.raises(ValueError, match="empty"):
        from minigpt.data import read_texts

        (tmp_path / "e.txt").write_text("  \n")
        read_texts([tmp_path / "e.txt"])


def test_batches_are_shifted_windows_and_validation_windows_are_fixed():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = random_batch(tokens, 5, 8, torch.Generator().manual_seed(0))
    assert torch.equal(y, x + 1) and x.shape == (5, 8) and int(y.max()) <= 99
    assert fixed_windows(tokens, 3, 8) == [0, 46, 91]


def test_validation_windows_that_would_overlap_become_the_splits_non_overlapping_windows():
    tokens = np.arange(100, dtype=np.uint16)  # 99 targets: 12 windows of 8 fit side by side
    offsets = fixed_windows(tokens, 20, 8)
    assert offsets == [8 * i for i in range(12)]
    targets = [t for i in offsets for t in range(i + 1, i + 9)]
    assert len(targets) == len(set(targets)) == 96  # every target read once
    assert fixed_windows(tokens, 12, 8) == offsets  # exactly as many as fit: the same windows
    eleven = fixed_windows(tokens, 11, 8)
    assert len(eleven) == 11 and min(b - a for a, b in zip(eleven, eleven[1:])) >= 8 and eleven[-1] == 91


def test_random_batches_draw_every_offset_whose_window_and_target_fit():
    """random_batch: offsets 0 .. N - T - 1, the last window's target ending at the last token, none beyond."""
    tokens = np.arange(12, dtype=np.uint16)  # T = 8: offsets 0, 1, 2, 3
    x, y = random_batch(tokens, 200, 8, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2, 3} and torch.equal(y, x + 1)


def test_validation_windows_keep_their_targets_inside_the_split():
    """fixed_windows: with N a multiple of T, the last token has no target, so only N // T - 1 windows fit."""
    tokens = np.arange(96, dtype=np.uint16)  # 95 targets: 11 windows of 8 side by side
    offsets = fixed_windows(tokens, 20, 8)
    assert offsets == [8 * i for i in range(11)] and offsets[-1] + 8 + 1 <= 96


def test_check_length_needs_block_size_plus_one_tokens_in_each_split():
    """check_length: a split of exactly block_size tokens is refused, block_size + 1 is enough."""
    TokenData(np.arange(18), None, 9, "t").check_length(8)  # 9 and 9 tokens
    with pytest.raises(ValueError, match="train split has 8 tokens"):
        TokenData(np.arange(17), None, 9, "t").check_length(8)


def test_reused_tokens_are_split_by_the_val_fraction_asked_for(tmp_path):
    """prepare: a second run that reuses the tokens on disk splits them by its own val_fraction."""
    first = prepare([TEXT[:3000]], tmp_path / "d", "char", val_fraction=0.25)
    again = prepare([TEXT[:3000]], tmp_path / "d", "char", val_fraction=0.25)
    assert first.n_val == again.n_val == int(0.25 * len(first.tokens))


# -- the CLI end to end ---------------------------------------------------------------------------------------


def test_cli_run_lowers_validation_loss_and_writes_its_outputs(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "run"
    train_mod.main(["--data", str(tmp_path / "text.txt"), "--tokenizer", "char", "--preset", "tiny",
                    "--max-iters", "60", "--eval-interval", "30", "--eval-iters", "4", "--batch-size", "8",
                    "--lr", "3e-3", "--warmup-iters", "5", "--out-dir", str(out), "--no-progress"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert vals[-1] < vals[0] - 0.5
    assert {"ckpt.pt", "best.pt", "loss.png", "metrics.jsonl", "model.json", "model.safetensors",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["tokenizer"]["type"] == "char" and ckpt["model_config"]["n_layer"] == 2
    # the run folder opens as its best model, the same weights as best.pt
    loaded = checkpoint.load(out)
    assert loaded.info["stage"] == "pretrain" and loaded.tokenizer.to_dict() == ckpt["tokenizer"]
    for name, t in ckpt["model"].items():
        assert torch.equal(loaded.model.state_dict()[name], t), name
    from minigpt.sample import sample

    texts = sample(loaded.model, loaded.tokenizer, prompt="3 plus", num_samples=2, max_new_tokens=10)
    assert len(texts) == 2 and all(t.startswith("3 plus") for t in texts)


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    common = ["--data", str(tmp_path / "text.txt"), "--tokenizer", "char", "--preset", "tiny", "--max-iters", "4",
              "--eval-interval", "100", "--eval-iters", "1", "--batch-size", "4", "--gradient-accumulation-steps",
              "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "minigpt.train", *common, "--out-dir", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "minigpt.train", *common, "--out-dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_checkpoint(tmp_path / d / "ckpt.pt")["model"] for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_cli_no_bias_builds_a_model_without_biases(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "run"
    train_mod.main(["--data", str(tmp_path / "text.txt"), "--tokenizer", "char", "--preset", "tiny", "--no-bias",
                    "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2",
                    "--out-dir", str(out), "--no-progress"])
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_config"]["bias"] is False
    assert not [k for k in ckpt["model"] if k.endswith(".bias")]


def test_resuming_a_run_whose_windows_overlapped_says_its_earlier_losses_used_other_windows(tmp_path, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "run"

    def args(iters, *more):  # 400 windows asked, 49 fit side by side
        return ["--data", str(tmp_path / "text.txt"), "--tokenizer", "char", "--preset", "tiny", "--max-iters",
                str(iters), "--eval-interval", "2", "--eval-iters", "100", "--batch-size", "4", "--out-dir",
                str(out), "--no-progress", "--no-plot", *more]

    train_mod.main(args(2))
    train_mod.main(args(4, "--resume"))
    assert "note: the run's earlier" not in capsys.readouterr().out  # the same windows throughout
    state = load_checkpoint(out / "ckpt.pt")
    assert state["eval_windows"] == 49
    save_checkpoint(out / "ckpt.pt", {k: v for k, v in state.items() if k != "eval_windows"})  # as saved before
    train_mod.main(args(6, "--resume"))
    assert "measured on 400 windows (a version that let them overlap), from now on on 49" in capsys.readouterr().out


def test_pretraining_uses_the_exact_gelu_and_a_run_from_before_the_option_resumes_as_it_was(tmp_path):
    """New runs get the exact GELU; a run saved before GPTConfig.activation existed trained with GPT-2's tanh form:
    --resume continues it with that form (with or without --activation gelu_tanh) and refuses --activation gelu."""
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "run"

    def args(iters, *more):
        return ["--data", str(tmp_path / "text.txt"), "--tokenizer", "char", "--preset", "tiny", "--max-iters",
                str(iters), "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--out-dir", str(out),
                "--no-progress", "--no-plot", *more]

    train_mod.main(args(2))
    state = load_checkpoint(out / "ckpt.pt")
    assert state["model_config"]["activation"] == "gelu"
    assert checkpoint.load(out).model.encoder.blocks[0].mlp.act.approximate == "none"
    # the run as an older version saved it: no activation in its model config or in its recorded settings
    old = {k: v for k, v in state["model_config"].items() if k != "activation"}
    settings = {**state["settings"], "pretrain": {k: v for k, v in state["settings"]["pretrain"].items()
                                                  if k != "activation"}}
    for name in ("ckpt.pt", "best.pt"):
        save_checkpoint(out / name, {**state, "model_config": old, "settings": settings})
    train_mod.main(args(4, "--resume"))
    assert load_checkpoint(out / "ckpt.pt")["model_config"]["activation"] == "gelu_tanh"
    train_mod.main(args(6, "--resume", "--activation", "gelu_tanh"))
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 5
    with pytest.raises(ValueError, match="activation"):
        train_mod.main(args(8, "--resume", "--activation", "gelu"))
    # check_resume alone, for a caller of pretrain(): the old run's shape against the new default is refused
    pcfg = train_mod.PretrainConfig(data=[str(tmp_path / "text.txt")], tokenizer="char", preset="tiny")
    data = prepare([TEXT], out / "data", "char")
    with pytest.raises(ValueError, match="activation.*gelu_tanh"):
        train_mod.check_resume({**state, "model_config": old}, pcfg, data, out)
    train_mod.check_resume({**state, "model_config": old}, dataclasses.replace(pcfg, activation="gelu_tanh"), data,
                           out)


# -- the optimizer, torch.compile and the evaluation ---------------------------------------------------------


def test_the_fused_adamw_on_cpu_takes_adamws_first_step():
    # step 1 of AdamW (Loshchilov & Hutter 2019): p <- p - lr * wd * p - lr * m_hat / (sqrt(v_hat) + eps), with
    # m_hat = g and v_hat = g^2 after bias correction; weight decay only in the first group
    model = GPT(preset("tiny", vocab_size=20))
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = train_mod.configure_optimizer(model, cfg, "cpu")
    assert opt.defaults["fused"] is True
    before = {id(p): p.detach().clone() for p in model.parameters()}
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for group in opt.param_groups:
        for p in group["params"]:
            p0, grad = before[id(p)], p.grad
            expected = p0 - 1e-2 * group["weight_decay"] * p0 - 1e-2 * grad / (grad.abs() + 1e-8)
            torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_compile_without_a_compiler_trains_in_eager_mode_and_says_so(tmp_path, monkeypatch, capsys):
    import torch._inductor.config as inductor_config

    from minigpt.device import compiler_missing, maybe_compile

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-compiler")))
    assert "C++ compiler" in compiler_missing(torch.device("cpu"))
    model = GPT(preset("tiny", vocab_size=20))
    assert maybe_compile(model, torch.device("cpu"), enabled=True) is model
    assert "running in eager mode" in capsys.readouterr().out
    assert maybe_compile(model, torch.device("cpu"), enabled=False) is model


def test_pretraining_evaluates_the_mean_loss_over_the_fixed_windows(tmp_path, monkeypatch, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "run"
    monkeypatch.setattr(train_mod, "EVAL_TOKENS_CPU", 20 * 32)  # passes of 20 windows of the tiny preset's 32
    train_mod.main(["--data", str(tmp_path / "text.txt"), "--tokenizer", "char", "--preset", "tiny",
                    "--max-iters", "1", "--eval-interval", "1", "--eval-iters", "100", "--batch-size", "4",
                    "--out-dir", str(out), "--no-progress", "--no-plot"])  # 400 asked, 49 fit: passes of 20, 20, 9
    assert "evaluation: 49 validation windows of 32 tokens (all that fit without overlap" in capsys.readouterr().out
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    ckpt = load_checkpoint(out / "ckpt.pt")  # the model the evaluation saw, after the one step
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    data = prepare([TEXT], out / "data", "char")
    T = model.config.block_size
    val = data.val.astype(np.int64)
    losses = []  # window by window, each its own forward pass
    with torch.no_grad():
        for i in fixed_windows(data.val, 100 * 4, T):
            x, y = torch.from_numpy(val[i : i + T])[None], torch.from_numpy(val[i + 1 : i + 1 + T])
            losses.append(torch.nn.functional.cross_entropy(model(x)[0][0], y).item())
    assert logged == pytest.approx(sum(losses) / len(losses), abs=1e-5)
