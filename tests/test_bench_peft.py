"""benchmarks/bench_peft.py in its tiny mode: every stage runs, the outputs appear, and the parameter counts in the
table equal the closed-form counts of each method on the tiny base (2 layers, 32 dims, vocabulary 512, block 128)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_peft", ROOT / "benchmarks" / "bench_peft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_peft")
    threads = torch.get_num_threads()
    results = bench.main(["--tiny", "--out", str(tmp / "out"), "--results-dir", str(tmp / "results")])
    assert torch.get_num_threads() == threads  # the benchmark puts the thread count back
    return results, tmp / "results"


def expected_counts(L=2, C=32, V=512, P=128, n=20, r=8, reduction_factor=16):
    """Trainable parameters of each method's default config, written out from the papers' shapes."""
    base = L * (12 * C * C + 13 * C) + V * C + P * C + 2 * C  # blocks, W_e (tied head), W_p, final LayerNorm
    H = C  # P-Tuning's LSTM hidden size and Prefix-Tuning's MLP width default to n_embd
    lstm = 2 * (4 * H * (C + H) + 8 * H) + 2 * (4 * H * (2 * H + H) + 8 * H)  # 2 layers x 2 directions
    m = C // reduction_factor
    return base, {
        "full": base,
        "bitfit": L * 11 * C + C,  # q, k, v, proj, fc (4C), mlp.proj, ln_1, ln_2 biases per block; ln_f's bias
        "prompt_tuning": n * C,  # P_e
        "p_tuning": n * C + lstm + (2 * H * 2 * H + 2 * H) + (2 * H * C + C),  # inputs, bi-LSTM, 2-layer MLP
        "prefix_tuning": n * C + (C * H + H) + (H * L * 2 * C + L * 2 * C),  # P', Linear, Linear to all layers
        "p_tuning_v2": L * 2 * n * C,  # a key and a value prefix per layer
        "lora": L * 2 * r * (C + C),  # A (r, in) and B (out, r) on query and value
        "dora": L * 2 * (r * (C + C) + C),  # LoRA's A and B and the magnitude m (out,) on query and value
        "ia3": L * (C + C + 4 * C),  # l_k, l_v, l_ff
        "adapter": 2 * L * (2 * m * C + m + C),  # after attention and after the MLP in every block
    }


def test_table_counts_match_the_closed_form(run):
    results, results_dir = run
    base, expected = expected_counts()
    table = (results_dir / "peft.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 12 and cells[0] in expected:
            rows[cells[0]] = cells
    assert set(rows) == set(expected)
    for method, count in expected.items():
        assert rows[method][2] == f"{count:,}", method
        r = results["methods"][method]
        assert r["trainable_params"] == count
        added = 0 if method in ("full", "bitfit") else count  # BitFit trains the base's own biases
        assert r["total_params"] == base + added
        assert method == "full" or r["trainable_params"] < r["total_params"]


def test_outputs_exist_and_are_complete(run):
    _results, results_dir = run
    for name in ("peft_accuracy_vs_params.png", "peft_cost.png"):
        data = (results_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    saved = json.loads((results_dir / "peft.json").read_text())
    assert set(saved["methods"]) == set(expected_counts()[1])
    assert set(saved["sweep"]) == set(saved["methods"])  # the tiny mode runs the sweep too
    for method, s in saved["sweep"].items():
        best = min(s["runs"], key=lambda r: r["answer_loss"])
        assert s["lr"] == best["lr"] == saved["methods"][method]["lr"]
        # the tiny grid has two rates, so the winner starts at its edge and one more rate past it is tried
        assert s["widened"] == 1 and len(s["runs"]) == 3
    survey = (results_dir / "peft_survey.md").read_text()
    for method in expected_counts()[1]:
        if method != "full":
            assert f"| {method} |" in survey
    verdicts = [survey.count(f"**{v}**") for v in ("confirmed", "contradicted", "within noise")]
    assert sum(verdicts) == 4 * 9  # storage, memory, backpropagation, inference for each of the nine methods
    for r in saved["methods"].values():
        assert r["saved_bytes"] > 0 and r["step_s"] > 0 and r["peak_bytes"] >= r["static_bytes"] > 0
    assert saved["inference"]["models"]["base"]["forward_ratio"] == 1.0
    assert "base (copy)" in saved["inference"]["models"] and saved["inference"]["noise"] >= 0.03
    for method, r in saved["methods"].items():  # merged LoRA / IA3 (unwrapped) and BitFit are the base's architecture
        assert r["structure"]["same"] == (method in ("full", "bitfit", "lora", "dora", "ia3")), method
        assert r["deploy_max_logit_diff"] < 1e-4, method


def test_merged_models_get_no_overhead_verdict_from_a_slow_timing(bench, run):
    """A deployed model with the base's exact architecture is confirmed to have no overhead (LoRA) or contradicts a
    claimed one (merged IA3), even when its timing is far above the noise floor."""
    results = json.loads(json.dumps(run[0]))
    for method in ("lora", "ia3"):
        results["inference"]["models"][method]["forward_ratio"] = 1.5
    v = bench.verdicts(results)
    assert v["lora"]["checks"][3][:2] == ("no inference overhead", "confirmed")
    assert v["ia3"]["checks"][3][1] == "contradicted"
    results["methods"]["adapter"]["structure"]["same"] = False
    results["inference"]["noise"] = 0.05
    results["inference"]["models"]["adapter"].update(forward_ratio=1.04, generate_ratio=1.02)
    assert bench.verdicts(results)["adapter"]["checks"][3][1] == "within noise"
    results["inference"]["models"]["adapter"]["generate_ratio"] = 1.2
    assert bench.verdicts(results)["adapter"]["checks"][3][1] == "confirmed"


def test_paired_ratio_divides_out_load_that_varies_between_rounds(bench):
    base = [1.0, 3.0, 1.0, 3.0, 1.0]  # a round under load takes 3x
    model = [1.1, 3.3, 1.1, 3.3, 1.1]
    assert bench.paired_ratio(model, base) == pytest.approx(1.1)


def test_rerender_rewrites_the_reports_from_the_json(bench, run):
    _, results_dir = run
    table = (results_dir / "peft.md").read_text()
    for name in ("peft.md", "peft_survey.md", "peft_cost.png"):
        (results_dir / name).unlink()
    bench.main(["--rerender", "--results-dir", str(results_dir)])
    assert (results_dir / "peft.md").read_text() == table
    assert (results_dir / "peft_survey.md").is_file() and (results_dir / "peft_cost.png").is_file()


def test_cpu_peak_memory_replays_the_allocations(bench):
    def step():
        a = torch.empty(2**20, dtype=torch.uint8)  # 1 MiB
        b = torch.empty(3 * 2**20, dtype=torch.uint8)  # 3 MiB while a is alive: 4 MiB
        del a, b
        c = torch.empty(2 * 2**20, dtype=torch.uint8)  # 2 MiB after both were freed
        return c

    assert bench.peak_allocated_during(step, torch.device("cpu")) == 4 * 2**20


def test_live_bytes_counts_tied_and_optimizer_tensors_once(bench):
    from minigpt import GPT, preset

    model = GPT(preset("tiny", vocab_size=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = model.num_parameters()  # the tied head shares W_e's storage
    assert bench.live_bytes(model, opt) == 4 * n
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()  # AdamW state: exp_avg and exp_avg_sq per parameter, plus a scalar step each
    steps = len(list(model.parameters()))
    assert bench.live_bytes(model, opt) == 4 * n + 2 * 4 * n + 4 * steps


def test_unwrap_after_merge_gives_the_base_architecture(bench):
    import copy

    import peft
    from minigpt import GPT, preset

    base = GPT(preset("tiny", vocab_size=64))
    for config in (peft.LoraConfig(), peft.IA3Config()):
        model = copy.deepcopy(base)
        peft.get_peft_model(model, config)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
        x = torch.randint(0, 64, (2, 8))
        expected = model(x)[0]
        assert bench.deploy(model, config.method) == "merged"
        assert bench.structure_vs_base(model, base)["same"]
        torch.testing.assert_close(model(x)[0], expected, rtol=1e-4, atol=1e-5)


def test_interleaving_calls_every_job_once_per_round_in_varying_order(bench):
    calls = []
    jobs = {k: (lambda k=k: calls.append(k)) for k in "abcdef"}
    medians = bench.interleaved_medians(jobs, 4, torch.device("cpu"))
    rounds = [calls[i : i + 6] for i in range(0, 24, 6)]
    assert all(sorted(r) == list("abcdef") for r in rounds) and set(medians) == set("abcdef")
    assert len({"".join(r) for r in rounds}) > 1


def test_hf_comparison_judges_each_pair_by_accuracy_within_one_standard_error(bench):
    """Pairs across published tiers are published '>', pairs within one '≈'; ours is '≈' when the accuracies differ
    by at most one standard error of the difference (n_test examples), and a disagreement is printed in bold."""
    acc = {"full": 0.40, "lora": 0.38, "ia3": 0.20, "prefix_tuning": 0.21, "p_tuning": 0.02, "prompt_tuning": 0.03,
           "bitfit": 0.10}
    results = {"mode": {"n_test": 200}, "methods": {m: {"accuracy": a} for m, a in acc.items()}}
    text = bench.hf_comparison(results)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and "," in line.split("|")[1]}
    assert len(rows) == 1 + 2 * 5 + 1 * 4 + 1 * 3 + 3  # within tiers: 1 + 3; across: 2*5 + 1*4 + 1*3
    assert rows["lora, full"][1:3] == ["≈", "≈"]  # 2 points apart, standard error of the difference ~4.9 points
    assert rows["lora, ia3"][1:3] == [">", ">"]
    assert rows["ia3, prefix_tuning"][1:3] == [">", "**≈**"]  # 1 point apart: a tie, not the published order
    assert rows["p_tuning, bitfit"][1:3] == ["≈", "**<**"]  # 2% against 10%, 8 points, more than one SE (2.3)
    agree = sum(r[2] == r[1] for r in rows.values())
    assert f"agree on {agree} of {len(rows)} pairs" in text
    assert bench.hf_comparison({"mode": {"n_test": 200}, "methods": {"full": {"accuracy": 0.4}}}) == ""


def test_default_mode_report_says_where_each_rate_comes_from(bench, run, tmp_path):
    """Without a sweep, at BENCH_LR, the table claims no sweep winners and prints every rate's source."""
    results = json.loads(json.dumps(run[0]))
    results["mode"].update(lr_table="bench", sweep_factors=[], widen=0)
    results["default_lr"] = {m: bench.BENCH_LR[m] for m in results["methods"]}
    text = bench.write_table(results, tmp_path / "peft.md")
    assert "won its sweep" not in text and "No learning-rate sweep in this run" in text
    for m in results["methods"]:
        assert f"| {m} | {bench.BENCH_LR[m]:g} | {bench.BENCH_LR_SOURCE[m]} |" in text
    assert set(bench.BENCH_LR_SOURCE) == set(bench.BENCH_LR) == set(bench.METHODS)
