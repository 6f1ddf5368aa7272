"""The reward functions and the evaluation: the checker's scores against the rubric by hand, the reward model read on
the tokens as sampled, and every evaluation metric with its standard error from per-sample values by hand."""

import math
import statistics

import pytest
import torch
from conftest import tiny_gpt

from minigpt import CharTokenizer, engine, tasks
from rlhf.evaluate import evaluate_policy, fmt, gain, gain_over_seeds, mean_se, over_seeds, sequence_kl, summarize
from rlhf.reward_model import RewardModel, save_reward_model
from rlhf.rewards import checker_reward, make_reward, open_reward_model, reward_model_reward, summed

EOS, PAD = 30, 31


class WordTokenizer:
    """Ids 0..29 stand for the words below; eos 30, pad 31."""

    words = ["12", "13", "the", "garden", "cat,", "sun,", "tree", "I", "think", "that", "is", "right"] + [
        f"w{i}" for i in range(18)]
    eos_token_id, pad_token_id = EOS, PAD

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def generation(responses, prompt_len=2):
    """A Generation of the given responses after a dummy prompt; rows that ended with eos are padded with PAD."""
    R = max(map(len, responses))
    rows = [r + [PAD] * (R - len(r)) for r in responses]
    response = torch.tensor(rows)
    tokens = torch.cat([torch.ones(len(rows), prompt_len, dtype=torch.long), response], 1)
    mask = engine.response_mask_of(response, EOS)
    return engine.Generation(tokens, torch.cat([torch.ones(len(rows), prompt_len, dtype=torch.long), mask], 1),
                             prompt_len, mask, EOS)


def test_the_checker_scores_by_the_rubric_and_exactly():
    # 12 / 12 and a remark / 13 / cut off at the longest length, without an eos (only rows that ended are padded)
    gen = generation([[0, EOS], [0, 7, 8, 9, 10, 11, EOS], [1, EOS], [2, 3, 2, 3, 2, 3, 2]])
    examples = [{"output": "12"}] * 4
    assert checker_reward(WordTokenizer())(gen, examples).tolist() == [1.0, 0.5, 0.25, 0.0]
    assert checker_reward(WordTokenizer(), exact=True)(gen, examples).tolist() == [1.0, 0.0, 0.0, 0.0]
    both = summed(checker_reward(WordTokenizer()), lambda g, e: torch.full((4,), 2.0))
    assert both(gen, examples).tolist() == [3.0, 2.5, 2.25, 2.0]
    with pytest.raises(ValueError, match="prompt 1 has none"):
        checker_reward(WordTokenizer())(gen, [{"output": "12"}, {}, {}, {}])
    with pytest.raises(ValueError, match="needs a reward model"):
        make_reward("both", WordTokenizer())


def test_the_reward_model_reads_each_response_as_sampled_without_an_eos_it_did_not_sample():
    rm = RewardModel(tiny_gpt(32)).eval()
    gen = generation([[4, 5, EOS, PAD], [4, 5, 6, 7], [9, EOS]])
    got = reward_model_reward(rm)(gen, None)
    with torch.no_grad():
        alone = [rm(torch.tensor([[1, 1] + r])).item() for r in ([4, 5, EOS], [4, 5, 6, 7], [9, EOS])]
    assert got.tolist() == pytest.approx(alone, abs=1e-5)


def test_mean_and_standard_error_by_hand():
    values = [1.0, 0.0, 0.0, 1.0, 1.0]
    mean, se = mean_se(values)
    assert mean == 0.6 and se == pytest.approx(math.sqrt(0.3 / 5))  # sample variance 0.3
    assert mean_se([0.25]) == (0.25, 0.0)


def test_summarize_every_metric_from_per_sample_values():
    per = {"greedy_correct": [[1.0], [0.0], [0.0]],
           "correct": [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]],
           "score": [[1.0, 0.5, 0.25, 1.0], [0.0, 0.0, 0.25, 0.0], [0.5, 1.0, 0.0, 0.0]],
           "remark": [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]],
           "truncated": [[0.0] * 4, [1.0, 1.0, 0.0, 0.0], [0.0] * 4],
           "response_len": [[2.0] * 4, [24.0, 24.0, 3.0, 3.0], [4.0] * 4],
           "kl": [[0.5, 0.1, 0.2, 0.2], [0.0] * 4, [1.0] * 4], "rm_score": [[], [], []]}
    out = summarize(per, ["a", "b", "a"])
    assert out["greedy_accuracy"]["mean"] == pytest.approx(1 / 3)
    assert out["sampled_accuracy"]["mean"] == pytest.approx((0.5 + 0 + 0.25) / 3)
    assert out["pass_at_k"]["mean"] == pytest.approx(2 / 3)
    assert out["true_score"]["mean"] == pytest.approx((0.6875 + 0.0625 + 0.375) / 3)
    assert out["remarks"]["mean"] == pytest.approx((0.25 + 0 + 0.5) / 3)
    assert out["truncated"]["mean"] == pytest.approx(0.5 / 3) and out["kl"]["mean"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert out["sampled_accuracy"]["se"] == pytest.approx(statistics.stdev([0.5, 0.0, 0.25]) / math.sqrt(3))
    assert "rm_score" not in out  # not measured
    assert out["by_task"]["a"]["greedy_accuracy"]["mean"] == 0.5 and out["n_prompts"] == 3


def test_the_paired_gain_and_the_spread_over_seeds():
    before = {"per_prompt": {"greedy_accuracy": [1.0, 0.0, 0.0, 1.0]}}
    after = {"per_prompt": {"greedy_accuracy": [1.0, 1.0, 0.0, 1.0]}}
    g = gain(before, after)
    assert g["mean"] == 0.25 and g["se"] == pytest.approx(statistics.stdev([0, 1, 0, 0]) / 2)
    runs = [{"greedy_accuracy": {"mean": m, "se": 0.1}} for m in (0.4, 0.5, 0.6)]
    assert over_seeds(runs)["greedy_accuracy"] == pytest.approx({"mean": 0.5, "sd": 0.1})
    # averaged over two runs first: per prompt (1 + 1) / 2 - 1 = 0, 1, 0.5, -0.5; mean 0.25, sd sqrt(1.25 / 3)
    averaged = gain_over_seeds([1.0, 0.0, 0.0, 1.0], [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert averaged == pytest.approx({"mean": 0.25, "se": math.sqrt(1.25 / 3) / 2})


def test_evaluate_policy_measures_a_model_against_itself_as_kl_0(bpe_tok):
    model = tiny_gpt(bpe_tok.vocab_size, block_size=128)
    examples = tasks.ppo_prompts(n_train=0, n_test=6)[1]
    out = evaluate_policy(model, bpe_tok, examples, k=2, max_new_tokens=5, with_kl=True,
                          reference=tiny_gpt(bpe_tok.vocab_size, block_size=128))  # the same weights (the same seed)
    assert out["kl"]["mean"] == pytest.approx(0.0, abs=1e-6) and out["k"] == 2 and len(out["greedy_answers"]) == 6
    assert set(out["by_task"]) == {ex["task"] for ex in examples}
    assert all(len(v) == 6 for v in out["per_prompt"].values())


def test_per_task_metrics_take_each_tasks_own_prompts():
    """by_task averages the prompts of that task, wherever they stand in the list."""
    per = {"greedy_correct": [[1.0], [0.0], [0.0]], "correct": [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
           "score": [[1.0, 0.5], [1.0, 1.0], [0.0, 0.25]], "remark": [[0.0] * 2] * 3, "truncated": [[0.0] * 2] * 3,
           "response_len": [[2.0] * 2] * 3}
    a = summarize(per, ["a", "b", "a"])["by_task"]["a"]  # prompts 0 and 2
    assert a["greedy_accuracy"] == pytest.approx({"mean": 0.5, "se": 0.5})  # stdev([1, 0]) / sqrt(2)
    assert a["sampled_accuracy"] == pytest.approx({"mean": 0.25, "se": 0.25})
    assert a["true_score"] == pytest.approx({"mean": 0.4375, "se": 0.3125})  # prompts 0.75 and 0.125


def test_fmt_writes_mean_and_spread():
    """fmt: "mean ± se" (or sd), in percent with both scaled by 100."""
    assert fmt({"mean": 0.452, "se": 0.035}) == "0.452 ± 0.035"
    assert fmt({"mean": 0.452, "sd": 0.035}, digits=2) == "0.45 ± 0.04"
    assert fmt({"mean": 0.452, "se": 0.035}, percent=True) == "45.2% ± 3.5"


def test_the_kl_sums_log_pi_minus_log_pi_ref_over_each_response_up_to_its_eos():
    """sequence_kl: per row, the sum over response tokens up to eos of log pi - log pi_ref at the temperature."""
    model, ref = tiny_gpt(32).eval(), tiny_gpt(32, seed=1).eval()
    responses = [[4, 5, EOS], [4, 5, 6, 7], [9, EOS]]
    got = sequence_kl(model, ref, generation(responses), temperature=2.0)
    with torch.no_grad():
        expected = []
        for r in responses:
            seq = torch.tensor([[1, 1] + r])
            lp, lq = (torch.log_softmax(m(seq)[0][0] / 2.0, -1) for m in (model, ref))
            expected.append(sum(lp[1 + t, a] - lq[1 + t, a] for t, a in enumerate(r)).item())
    assert got.tolist() == pytest.approx(expected, abs=1e-5) and min(map(abs, expected)) > 1e-3


def test_evaluate_policy_books_each_sample_to_its_prompt(monkeypatch):
    """evaluate_policy: k samples per prompt across batches, each scored against its own prompt's answer."""
    class Tok(WordTokenizer):
        def encode(self, text):
            return [self.words.index(w) for w in text.split()]

    examples = [{"prompt": "w0", "output": "12"}, {"prompt": "w1", "output": "the garden"},
                {"prompt": "w2", "output": "13"}]
    samples = {12: [[0, EOS], [0, 7, 8, 9, 10, 11, EOS]], 13: [[2, 3, EOS], [3] * 7], 14: [[1, EOS], [0, EOS]]}
    sizes = []

    def complete(model, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return generation([samples[p[0]].pop(0) for p in prompts])

    monkeypatch.setattr(engine, "complete", complete)
    monkeypatch.setattr(engine, "complete_all", lambda *args, **kwargs: [[0], [2, 3], [0]])
    out = evaluate_policy(torch.nn.Linear(1, 1), Tok(), examples, k=2, batch_size=4)
    assert sizes == [4, 2] and out["greedy_answers"] == ["12", "the garden", "12"]
    per = out["per_prompt"]
    assert per["greedy_accuracy"] == [1.0, 1.0, 0.0]
    assert per["sampled_accuracy"] == [0.5, 0.5, 0.5] and per["pass_at_k"] == [1.0, 1.0, 1.0]
    assert per["remarks"] == [0.5, 0.0, 0.0] and per["truncated"] == [0.0, 0.5, 0.0]
    assert per["response_len"] == [(2 + 7) / 2, (3 + 7) / 2, 2.0]  # response tokens up to and with eos


def test_each_response_is_checked_against_its_own_answer_even_when_cut_off():
    """Prompts with different answers; the last response has no eos and is scored on its text ("12 I think": 0.5)."""
    gen = generation([[0, EOS], [1, EOS], [2, 3, EOS], [0, 7, 8]])
    examples = [{"output": "12"}, {"output": "13"}, {"output": "the garden"}, {"output": "12"}]
    assert checker_reward(WordTokenizer())(gen, examples).tolist() == [1.0, 1.0, 1.0, 0.5]
    assert checker_reward(WordTokenizer(), exact=True)(gen, examples).tolist() == [1.0, 1.0, 1.0, 0.0]


def test_make_reward_builds_each_kind_from_the_reward_model_and_the_rubric():
    """reward_model: r_phi alone, without a graph; checker: the graded rubric; exact: 1 or 0; both: r_phi + rubric."""
    rm = RewardModel(tiny_gpt(32)).eval()
    responses = [[0, EOS], [1, EOS], [2, 3, EOS], [0, 7, 8]]
    gen, examples = generation(responses), [{"output": "12"}, {"output": "13"}, {"output": "the garden"}, {"output": "12"}]
    with torch.no_grad():
        alone = [rm(torch.tensor([[1, 1] + r])).item() for r in responses]
    rubric, exact = [1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 0.0]
    expected = {"reward_model": alone, "checker": rubric, "exact": exact, "both": [a + s for a, s in zip(alone, rubric)]}
    for kind, values in expected.items():
        got = make_reward(kind, WordTokenizer(), rm)(gen, examples)
        assert got.tolist() == pytest.approx(values, abs=1e-5) and not got.requires_grad, kind
    with pytest.raises(ValueError, match="reward must be one of"):
        make_reward("rm", WordTokenizer(), rm)


def test_open_reward_model_loads_it_when_used_or_present_and_refuses_another_tokenizer(tmp_path):
    """None for a checker run without a reward model; the frozen model when the run uses it or it is there anyway."""
    tok = CharTokenizer.train("abcdef")
    save_reward_model(RewardModel(tiny_gpt(tok.vocab_size, block_size=16)), tok, tmp_path / "reward")
    assert open_reward_model(None, "checker", tok, "cpu") is None
    assert open_reward_model(tmp_path / "absent", "exact", tok, "cpu") is None
    for kind in ("checker", "both"):
        rm = open_reward_model(tmp_path / "reward", kind, tok, "cpu")
        assert isinstance(rm, RewardModel) and not any(p.requires_grad for p in rm.parameters()), kind
    with pytest.raises(ValueError, match="they must be the same"):
        open_reward_model(tmp_path / "reward", "reward_model", CharTokenizer.train("xyz"), "cpu")
    for kind in ("reward_model", "both"):  # a reward that needs the model, without one: said, not a TypeError
        with pytest.raises(ValueError, match=f"the reward '{kind}' needs a reward model, and none was given"):
            open_reward_model(None, kind, tok, "cpu")
