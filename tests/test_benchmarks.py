"""The plumbing of the speed benchmarks, at tiny sizes and with no time asserted: nanoGPT's command line and the
parsing of its output (against a stand-in train.py), the side-by-side ratios, the step profile's table, and the GPU
script's --smoke path (CPU, one tiny shape, no compiling)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_pretrain():
    return load("bench_pretrain")


def test_nanogpt_flags_are_the_baby_run(bench_pretrain):
    flags = bench_pretrain.nanogpt_flags(bench_pretrain.BABY)
    assert flags[:3] == ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False"]
    for flag in ("--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=12",
                 "--max_iters=2000", "--lr_decay_iters=2000", "--eval_iters=200", "--dropout=0.0"):
        assert flag in flags


FAKE_TRAIN = """import sys
print("args", sys.argv[1:])
for i, v in ((0, 4.2), (100, 2.5), (200, 2.1)):
    print(f"step {i}: train loss {v - 0.1:.4f}, val loss {v:.4f}")
    print(f"iter {i}: loss {v:.4f}, time 10.00ms, mfu -100.00%")
"""


def test_nanogpt_run_is_parsed_from_its_output(bench_pretrain, tmp_path):
    """A stand-in checkout with nanoGPT's file layout: prepared, run, and its evaluations read back."""
    fake = tmp_path / "nanogpt"
    (fake / "config").mkdir(parents=True)
    (fake / "data" / "shakespeare_char").mkdir(parents=True)
    (fake / "train.py").write_text(FAKE_TRAIN)
    for f in ("model.py", "configurator.py", "config/train_shakespeare_char.py"):
        (fake / f).write_text("")
    (fake / "data" / "shakespeare_char" / "prepare.py").write_text(
        "import pathlib; assert pathlib.Path('input.txt').read_text() == 'to be'\n")
    data = tmp_path / "input.txt"
    data.write_text("to be")
    work = bench_pretrain.prepare_nanogpt(fake, str(data), tmp_path / "work")
    res = bench_pretrain.run_nanogpt(work, "nanoGPT, round 1", dict(bench_pretrain.BABY, max_iters=200))
    assert res["val_loss"] == 2.1 and res["iters"] == 201
    assert res["curve"] == [(0, 4.2), (100, 2.5), (200, 2.1)]
    with pytest.raises(SystemExit, match="not a nanoGPT checkout"):
        bench_pretrain.prepare_nanogpt(tmp_path / "nowhere", str(data), tmp_path / "work2")


def test_side_by_side_ratios_pair_runs_of_the_same_round(bench_pretrain):
    def run(kind, rnd, wall):
        return {"name": f"{kind}, round {rnd}", "kind": kind, "wall_s": wall}

    results = [run("nanoGPT", 1, 100.0), run("minigpt", 1, 80.0), run("minigpt", 2, 90.0), run("nanoGPT", 2, 200.0)]
    (line,) = bench_pretrain.side_by_side_ratios(results)
    assert line.startswith("minigpt / nanoGPT wall time: 0.625 (rounds: 0.800, 0.450")


def test_profile_at_a_tiny_shape(bench_pretrain, monkeypatch):
    import minigpt.device

    monkeypatch.setattr(minigpt.device, "compiler_missing", lambda device: "no compiler in this test")
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16}
    r = bench_pretrain.profile_shape("tiny", shape, batch=4, steps=2)
    assert r["compile"] == "no compiler in this test"
    parts = r["ms"]
    assert parts["attention forward"] > 0 and parts["MLP backward"] > 0
    table = bench_pretrain.profile_table([r], threads=1)
    assert "## tiny: batch 4, block 16" in table and "optimizer: fused AdamW (now)" in table


def test_gpu_script_smoke_on_one_tiny_shape(tmp_path, monkeypatch):
    bench_gpu = load("bench_gpu")
    monkeypatch.setattr(bench_gpu, "SMOKE_SHAPES",
                        {"tiny 1x2x32": ({"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}, 4, 6, 3e-3)})
    bench_gpu.main(["--smoke", "--no-compile", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["variant"] for r in results["train"]] == ["float32", "bf16 autocast"]
    gen = results["generation"]["tiny 1x2x32"]
    assert gen["float32 batch 64 tokens/s"] > 0 and 0 <= gen["greedy tokens the same, batch 64"] <= 1
    assert "SMOKE RUN" in (tmp_path / "gpu.md").read_text()
    assert not (ROOT / "benchmarks" / "results" / "gpu.md").exists() or "SMOKE" not in (
        ROOT / "benchmarks" / "results" / "gpu.md").read_text()


def test_rl_headroom_counts_prompts_by_their_greedy_and_sampled_answers(tmp_path, monkeypatch):
    import types

    from minigpt import checkpoint
    from rlhf import evaluate

    bench_rl = load("bench_rl")
    monkeypatch.setattr(checkpoint, "load", lambda folder: types.SimpleNamespace(model=None, tokenizer=None))
    greedy, sampled = [0.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.25, 0.125, 0.4375, 0.875]  # five prompts, 16 samples each
    monkeypatch.setattr(evaluate, "evaluate_policy", lambda *a, **k: {
        "per_prompt": {"greedy_accuracy": greedy, "sampled_accuracy": sampled},
        "sampled_accuracy": {"mean": sum(sampled) / 5, "se": 0.0}})
    text = bench_rl.headroom("out/pipeline", 5, tmp_path / "h.md", temperatures=(0.5,))
    # greedy wrong on 3: a right sample on 2, a quarter right on 1; greedy right on 2: under half right on 1
    assert "| 0.5 | 33.8% | 2 of 3 | 1 of 3 | 1 of 2 |" in text
    assert "Greedy accuracy 40.0% (2 of 5)." in text and (tmp_path / "h.md").read_text() == text


def test_rl_greedy_gain_pairs_each_run_with_the_sft_model_on_distinct_prompts(tmp_path, monkeypatch):
    """Each held-out prompt is counted once (a repeated one twice would weigh it double); each run's gain is paired
    with the SFT model's answers on the same prompts, and the last row averages the runs per prompt first."""
    from minigpt import checkpoint
    from rlhf import evaluate, prompts

    bench_rl = load("bench_rl")
    rows = [{"instruction": f"q{i}", "input": "", "output": "yes", "prompt": f"q{i}"} for i in range(4)]
    monkeypatch.setattr(prompts, "builtin_prompts", lambda n_test: ([], rows + rows[:2]))  # two repeated
    monkeypatch.setattr(checkpoint, "load_model", lambda folder: (folder, None))
    answers = {"base/sft": "yes no no yes", "a": "yes yes no no", "b": "yes yes yes yes"}  # prompt by prompt
    monkeypatch.setattr(evaluate, "greedy_answers", lambda model, tok, examples: answers[model].split()[:len(examples)])
    text = bench_rl.greedy_gain("base", [["a", "b"], ["b"]], 6, tmp_path / "g.md")
    assert "4 distinct held-out prompts (of the first 6" in text and "greedy accuracy 50.0%" in text
    se_a = math.sqrt((0 + 1 + 0 + 1) / 3) / 2  # changes 0, +1, 0, -1: mean 0
    assert f"| a | 50.0% | +0.00 ({100 * se_a:.2f}) |" in text
    se_b = math.sqrt((0.5 ** 2 * 2 + 0.5 ** 2 * 2) / 3) / 2  # changes 0, 1, 1, 0: mean 0.5
    assert f"| b | 100.0% | +50.00 ({100 * se_b:.2f}) | {0.5 / se_b:.2f} | 2 | 0 |" in text
    se_mean = math.sqrt((0.25 ** 2 + 0.75 ** 2 + 0.25 ** 2 + 0.75 ** 2) / 3) / 2  # per prompt 0, 1, 0.5, -0.5
    assert f"| the 2 run(s) above, averaged per prompt | 75.0% | +25.00 ({100 * se_mean:.2f}) |" in text
    assert f"| the 1 run(s) above, averaged per prompt | 100.0% | +50.00 ({100 * se_b:.2f}) |" in text  # b's group alone
    assert (tmp_path / "g.md").read_text() == text


def test_rl_table_gives_every_method_the_same_budget_of_sampled_responses():
    bench_rl = load("bench_rl")
    for budget in (1920, 7680):
        c = {m: bench_rl.configs(m, 0, "out/x", budget) for m in bench_rl.METHODS}
        for m in ("ppo_rm", "ppo_rm_beta1", "ppo_checker"):
            assert c[m]["ppo"]["steps"] * c[m]["ppo"]["batch_size"] == budget
        g = c["grpo_checker"]["grpo"]
        assert g["steps"] * g["prompts_per_step"] * g["group_size"] == budget
        d = c["dpo_on_policy"]["dpo"]
        assert d["pairs"] == "on_policy" and d["on_policy_prompts"] * d["samples_per_prompt"] == budget
        assert c["dpo_builtin"]["dpo"]["pairs"] == "builtin"
        assert c["dpo_builtin"]["train"]["max_iters"] == c["dpo_on_policy"]["train"]["max_iters"] == 192
    assert all(bench_rl.configs(m, 0, "out/x", 7680, dpo_steps=50)["train"]["max_iters"] == 50
               for m in ("dpo_builtin", "dpo_on_policy"))
    ppo = bench_rl.configs("ppo_checker", 0, "out/x")["ppo"]  # rl_greedy.md's recipe: 2 passes of 32 = 4 updates
    assert (ppo["ppo_epochs"], ppo["minibatch_size"], ppo["beta"], ppo["temperature"]) == (2, 32, 0.1, 0.7)


def test_rl_wide_gain_averages_each_prompt_over_seeds_on_distinct_prompts(tmp_path, monkeypatch):
    from minigpt import checkpoint
    from rlhf import evaluate, prompts

    bench_rl = load("bench_rl")
    rows = [{"instruction": f"q{i}", "input": "", "output": "yes", "prompt": f"q{i}"} for i in range(4)]
    monkeypatch.setattr(prompts, "builtin_prompts", lambda n_test: ([], rows + rows[:1]))  # q0 twice
    monkeypatch.setattr(checkpoint, "load_model", lambda folder: (folder, None))
    answers = {"base/sft": "yes no no no", "a0": "yes yes no no", "a1": "no yes yes no", "b0": "no no no no"}
    monkeypatch.setattr(evaluate, "greedy_answers", lambda model, tok, examples: answers[model].split()[:len(examples)])
    wide = bench_rl.wide_gains("base", {"a": ["a0", "a1"], "b": ["b0"]}, 5)
    assert wide["n_prompts"] == 4 and wide["sft_accuracy"] == 0.25
    a = [-0.5, 1.0, 0.5, 0.0]  # per prompt: the two seeds' mean less the SFT model's
    mean_a = sum(a) / 4
    se_a = math.sqrt(sum((x - mean_a) ** 2 for x in a) / 3) / 2
    assert wide["methods"]["a"]["mean"] == pytest.approx(mean_a) and wide["methods"]["a"]["se"] == pytest.approx(se_a)
    assert wide["methods"]["b"]["mean"] == pytest.approx(-0.25)


def test_rl_table_rows_have_as_many_cells_as_the_header_with_and_without_the_wide_column(tmp_path):
    import types

    bench_rl = load("bench_rl")
    ev = {k: {"mean": 0.5, "se": 0.1} for k, _, _ in bench_rl.COLUMNS} | {"n_prompts": 4}
    table = {"sft": {}, "grpo_checker": {k: {"mean": 0.5, "sd": 0.1} for k, _, _ in bench_rl.COLUMNS}
             | {"gain": {"mean": 0.02, "sd": 0.01}, "gain_se": 0.03, "wall_s": {"mean": 9.0, "sd": 0.0}, "seeds": 3}}
    args = types.SimpleNamespace(base="out/pipeline", budget=128, gain_prompts=10, dpo_steps=12)
    wide = {"n_prompts": 7, "sft_accuracy": 0.5, "methods": {"grpo_checker": {"mean": 0.031, "se": 0.012}}}
    for w in (None, wide):
        text = bench_rl.write_table(table, [{"before": ev}], tmp_path / "rl.md", args, w)
        rows = [line for line in text.splitlines() if line.startswith("|")]
        assert len(rows) == 4 and len({row.count("|") for row in rows}) == 1
        assert rows[0].count("|") == len(bench_rl.COLUMNS) + 4 + (w is not None)
    assert "| +3.1 (1.2) | 9 s |" in rows[-1] and "greedy gain on 7 (SE)" in rows[0] and "12 optimizer steps" in text


def test_demo_timing_runs_both_baby_runs_and_divides_by_each(tmp_path, monkeypatch):
    """bench_demo: nanoGPT's baby run with the README's --eval_iters=20 and the config's 200, then the demo; the
    table's ratios are the demo's wall time over each (by hand: 450 / 100 and 450 / 250)."""
    bench_demo = load("bench_demo")
    fake = tmp_path / "nanogpt"
    (fake / "config").mkdir(parents=True)
    (fake / "data" / "shakespeare_char").mkdir(parents=True)
    (fake / "train.py").write_text("import sys\nopen('args.txt', 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                                   "print('step 0: train loss 1.9000, val loss 1.8800')\n")
    for f in ("model.py", "configurator.py", "config/train_shakespeare_char.py", "data/shakespeare_char/prepare.py"):
        (fake / f).write_text("")
    data = tmp_path / "input.txt"
    data.write_text("to be")
    seen = {}

    def fake_demo(work, pipeline_only):
        seen["args"] = (work / "nanogpt" / "args.txt").read_text().splitlines()
        return {"wall_s": 450.0, "stages": {"pretrain": 170.0, "sft": 113.0, "reward": 98.0, "ppo": 65.0},
                "val_loss": 0.886, "sft_accuracy": 0.425, "rm_accuracy": 0.964, "report": "# the report"}

    monkeypatch.setattr(bench_demo, "time_demo", fake_demo)
    bench_demo.main(["--nanogpt", str(fake), "--data", str(data), "--pipeline-only", "--out", str(tmp_path / "t.md")])
    assert (tmp_path / "t_report.md").read_text() == "# the report" and "| 450.0 |" in (tmp_path / "t.md").read_text()
    assert [[f for f in a.split() if f.startswith("--eval_iters=")] for a in seen["args"]] == [
        ["--eval_iters=20"], ["--eval_iters=200"]]
    text = bench_demo.table({"eval_iters 20": {"wall_s": 100.0, "val_loss": 1.88},
                             "eval_iters 200": {"wall_s": 250.0, "val_loss": 1.90}},
                            {"wall_s": 450.0, "stages": {"pretrain": 170.0, "sft": 113.0, "reward": 98.0, "ppo": 65.0},
                             "val_loss": 0.886, "sft_accuracy": 0.425, "rm_accuracy": 0.964}, pipeline_only=False)
    assert "| 450.0 | 4.50x | 1.80x |" in text
    assert text.endswith("Stages: pretrain 170 s, sft 113 s, reward 98 s, ppo 65 s (sum 446 s). Pretraining validation "
                         "loss 0.886, SFT accuracy 42.5%, reward-model accuracy 96.4%.")
