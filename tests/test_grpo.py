"""GRPO against independent computations: group advantages by hand (an all-equal group included), each loss
aggregation by hand, the gradient at ratio 1 against REINFORCE with a group baseline, the k3 KL term, and bandits."""

import math

import pytest
import torch
from conftest import save_folder, tiny_gpt
from test_ppo import EOS, TOK, prompts

from rlhf.grpo import Groups, GRPOConfig, aggregate, group_advantages, grpo_loss, grpo_update, sample_groups, train_grpo
from rlhf.policy import make_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_advantages_by_hand_with_an_all_equal_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,   0.5, 0.5, 0.5, 0.5,   0.0, 0.25, 1.0, 0.0])
    adv, equal = group_advantages(rewards, 4)
    for g, rs in enumerate(([1.0, 0.0, 0.0, 1.0], [0.5] * 4, [0.0, 0.25, 1.0, 0.0])):
        mean = sum(rs) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / 3)  # the sample std
        expected = [0.0] * 4 if std == 0 else [(r - mean) / (std + 1e-4) for r in rs]
        assert adv[4 * g : 4 * g + 4].tolist() == pytest.approx(expected, abs=1e-6)
    assert equal.tolist() == [False, True, False]
    assert not torch.isnan(adv).any()
    centred, _ = group_advantages(rewards, 4, scale=False)  # Dr. GRPO: no division by the std
    assert centred[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5]) and (centred[4:8] == 0).all()


def test_an_all_equal_group_gets_exactly_zero_even_when_its_mean_is_inexact():
    rewards = torch.tensor([0.7] * 8 + [0.1, 0.9] * 4, dtype=torch.float32)  # 0.7 * 8 / 8 != 0.7 in float32
    assert (rewards[:8] - rewards[:8].mean()).abs().max() > 0  # what the formula alone would divide by std + eps
    for scale in (True, False):
        adv, equal = group_advantages(rewards, 8, scale=scale)
        assert equal.tolist() == [True, False] and (adv[:8] == 0).all() and (adv[8:] != 0).all()


def test_each_group_holds_the_responses_to_one_prompt():
    policy = tiny_gpt(8)
    cfg = GRPOConfig(prompts_per_step=3, group_size=4, minibatch_size=4, max_new_tokens=2)
    examples = [dict(p, id=i) for i, p in enumerate(prompts([1, 2], [4], [5, 5, 5]))]
    groups = sample_groups(policy, TOK, examples, lambda gen, exs: torch.tensor([float(e["id"]) for e in exs]), cfg,
                           make_reference(policy), torch.Generator().manual_seed(0))
    assert groups.rewards.view(3, 4).tolist() == [[0.0] * 4, [1.0] * 4, [2.0] * 4]
    P = groups.gen.prompt_len
    for row in range(12):
        prompt = [t for t, m in zip(groups.gen.tokens[row, :P].tolist(), groups.gen.attention_mask[row, :P]) if m]
        assert prompt == TOK.encode(examples[row // 4]["prompt"])


@pytest.mark.parametrize("scale", [True, False])
def test_sample_groups_passes_scale_rewards_on_to_the_advantages(scale):
    """The sampled groups' advantages: reward less the group's mean, over its sample std + 1e-4 unless Dr. GRPO's."""
    import statistics

    policy = tiny_gpt(8)
    cfg = GRPOConfig(prompts_per_step=2, group_size=4, minibatch_size=4, max_new_tokens=3, scale_rewards=scale)
    reward = lambda gen, exs: torch.tensor([float(sum(r)) for r in gen.responses()])  # noqa: E731
    g = sample_groups(policy, TOK, prompts([1, 2], [4]), reward, cfg, make_reference(policy),
                      torch.Generator().manual_seed(0))
    groups = g.rewards.view(2, 4).tolist()
    expected = [(r - sum(rs) / 4) / (statistics.stdev(rs) + 1e-4 if scale else 1) for rs in groups for r in rs]
    assert all(len(set(rs)) > 1 and statistics.stdev(rs) != pytest.approx(1) for rs in groups)
    assert g.advantages.tolist() == pytest.approx(expected, abs=1e-5)

def test_each_aggregation_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert aggregate(per_token, mask, "grpo", 4).item() == pytest.approx((6 / 3 + 4 / 1 + 4 / 4) / 3)
    assert aggregate(per_token, mask, "dapo", 4).item() == pytest.approx((6 + 4 + 4) / 8)
    assert aggregate(per_token, mask, "dr_grpo", 4).item() == pytest.approx((6 + 4 + 4) / (3 * 4))


def test_dr_grpo_divides_by_max_new_tokens_even_when_every_response_stopped_early():
    """dr_grpo's normaliser is N * max_new_tokens, a constant, not the width of the batch's longest response."""
    per_token, mask = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert aggregate(per_token, mask, "dr_grpo", 5).item() == pytest.approx((1 + 2 + 3) / (2 * 5))


def test_clipfrac_counts_only_the_tokens_the_clip_holds_back():
    """A ratio outside [1 - eps, 1 + eps] is clipped only where the min picks the clipped term: above with A > 0,
    below with A < 0; 1.5 with A < 0 and 0.5 with A > 0 keep their gradient."""
    cfg = GRPOConfig(beta=0.0, cliprange=0.2)
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 0.9]])
    adv = torch.tensor([1.0, -1.0])
    clipped = [[r > 1.2 if a > 0 else r < 0.8 for r in row] for row, a in zip(ratios.tolist(), adv.tolist())]
    _, stats = grpo_loss(torch.log(ratios), torch.zeros(2, 3), torch.zeros(2, 3), adv, torch.ones(2, 3), cfg)
    assert stats["clipfrac"].item() == pytest.approx(sum(map(sum, clipped)) / 6) and sum(map(sum, clipped)) == 2

def test_the_loss_with_its_clip_and_k3_kl_by_hand():
    cfg = GRPOConfig(beta=0.3, cliprange=0.2, loss_type="dapo")
    logp = torch.log(torch.tensor([[0.6, 0.3], [0.2, 0.5]]))
    old = torch.log(torch.tensor([[0.4, 0.3], [0.4, 0.5]]))  # ratios 1.5, 1.0 / 0.5, 1.0
    ref = torch.log(torch.tensor([[0.5, 0.2], [0.25, 0.5]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 2)
    loss, stats = grpo_loss(logp, old, ref, adv, mask, cfg)
    per_token = []
    for i in range(2):
        for t in range(2):
            r = math.exp(logp[i, t] - old[i, t])
            a = adv[i].item()
            surrogate = min(r * a, min(max(r, 0.8), 1.2) * a)
            q = math.exp(ref[i, t] - logp[i, t])  # pi_ref / pi
            per_token.append(-(surrogate - 0.3 * (q - math.log(q) - 1)))
    assert loss.item() == pytest.approx(sum(per_token) / 4, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 4)  # 1.5 with A > 0 and 0.5 with A < 0 are clipped


def test_at_ratio_one_the_gradient_is_reinforce_with_a_group_baseline():
    """With pi_old = pi and beta = 0, d/dtheta of the GRPO loss equals that of
    -(1/N) sum_i A_i (1/|o_i|) sum_t log pi(o_i,t), A_i the reward less the group's mean over its std."""
    policy = tiny_gpt(8)
    cfg = GRPOConfig(prompts_per_step=2, group_size=4, minibatch_size=8, max_new_tokens=4, temperature=0.9, beta=0.0)
    reward = lambda gen, exs: torch.tensor([float(r[:1] == [3]) + 0.1 * len(r) for r in gen.responses()])  # noqa
    groups = sample_groups(policy, TOK, prompts([1, 2], [4]), reward, cfg, make_reference(policy),
                           torch.Generator().manual_seed(0))
    gen = groups.gen
    mask = gen.response_mask.float()
    logits = policy(gen.tokens, attention_mask=gen.attention_mask)[0]
    logp = torch.log_softmax(logits[:, gen.prompt_len - 1 : -1] / 0.9, -1).gather(
        -1, gen.tokens[:, gen.prompt_len :, None])[..., 0]
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), groups.advantages, mask, cfg)
    grads = torch.autograd.grad(loss, list(policy.parameters()), retain_graph=True)
    r = groups.rewards.view(2, 4)
    baseline_adv = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-4)).flatten()
    reinforce = -sum(baseline_adv[i] * (logp[i] * mask[i]).sum() / mask[i].sum() for i in range(8)) / 8
    by_hand = torch.autograd.grad(reinforce, list(policy.parameters()))
    assert groups.rewards.std() > 0
    for a, b in zip(grads, by_hand):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _logp_by_hand(model, gen, temperature):
    """(log pi of each response token (N, R), logits/T at those positions (N, R, V)) from a full forward pass."""
    P = gen.prompt_len
    logits = model(gen.tokens, attention_mask=gen.attention_mask)[0][:, P - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, gen.tokens[:, P:, None])[..., 0], logits


def test_the_logged_metrics_of_a_step_by_hand():
    """One step at lr 1e-30 (the policy stays pi_old, ratio 1) with Dr. GRPO advantages: reward, reward_std_in_group,
    all_equal_groups, truncated, response_len, the k3 kl, entropy and loss -(A - beta k3) against sums written out."""
    import statistics

    policy, reference = tiny_gpt(8), tiny_gpt(8, seed=1)
    cfg = GRPOConfig(steps=1, prompts_per_step=3, group_size=4, minibatch_size=12, max_new_tokens=3, temperature=0.8,
                     lr=1e-30, beta=0.5, scale_rewards=False)
    seen = {}

    def reward(gen, exs):
        seen.update(gen=gen, prompts=[e["prompt"] for e in exs])  # the prompts come in a shuffled order
        return torch.tensor([float(sum(r) if e["prompt"] != "4" else 1) for r, e in zip(gen.responses(), exs)])

    (row,) = train_grpo(policy, TOK, prompts([1, 2], [4], [3]), reward, cfg, reference, progress=False)
    gen = seen["gen"]
    responses = [t[gen.prompt_len :] for t in gen.tokens.tolist()]
    ended = [EOS in r for r in responses]
    lengths = [r.index(EOS) + 1 if e else len(r) for r, e in zip(responses, ended)]
    rewards = [1.0 if q == "4" else float(sum(r[: n - e])) for q, r, n, e in zip(seen["prompts"], responses, lengths,
                                                                                    ended)]
    groups = [rewards[g : g + 4] for g in (0, 4, 8)]
    assert row["reward"] == pytest.approx(sum(rewards) / 12)
    assert row["reward_std_in_group"] == pytest.approx(sum(map(statistics.stdev, groups)) / 3, rel=1e-5)
    assert row["all_equal_groups"] == pytest.approx(sum(len(set(g)) == 1 for g in groups) / 3) and 0 < sum(ended)
    assert row["truncated"] == pytest.approx(1 - sum(ended) / 12) and row["response_len"] == pytest.approx(
        sum(lengths) / 12)
    with torch.no_grad():
        logp, logits = _logp_by_hand(policy, gen, 0.8)
        ref_logp, _ = _logp_by_hand(reference, gen, 0.8)
    q = torch.exp(ref_logp - logp)  # pi_ref / pi
    k3 = q - torch.log(q) - 1
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    tok = [(i, t) for i in range(12) for t in range(lengths[i])]
    assert row["kl"] == pytest.approx(sum(k3[i, t].item() for i, t in tok) / len(tok), rel=1e-4)
    assert row["update_kl"] == pytest.approx(row["kl"], rel=1e-4) and row["clipfrac"] == 0
    assert row["entropy"] == pytest.approx(sum(entropy[i, t].item() for i, t in tok) / len(tok), rel=1e-4)
    adv = [r - sum(g) / 4 for g in groups for r in g]  # Dr. GRPO: centred, not divided by the std
    per_response = [sum(-(adv[i] - 0.5 * k3[i, t].item()) for t in range(lengths[i])) / lengths[i] for i in range(12)]
    assert row["loss"] == pytest.approx(sum(per_response) / 12, rel=1e-4, abs=1e-6)


def test_every_inner_iteration_measures_the_ratio_against_the_policy_that_sampled():
    """grpo_update's pi_old is the sampling policy's log-probs, kept over the inner iterations, and each pass covers
    every sample: with pi_old 0.5 nats below pi (ratio e^0.5 > 1 + eps) and lr 0, the loss is -1.2 A per token of
    an A > 0 response (clipped) and -e^0.5 A where A < 0."""
    policy = tiny_gpt(8)
    cfg = GRPOConfig(prompts_per_step=2, group_size=4, minibatch_size=4, max_new_tokens=3, inner_iters=2, beta=0.0)
    reward = lambda gen, exs: torch.tensor([float(sum(r)) for r in gen.responses()])  # noqa: E731
    g = sample_groups(policy, TOK, prompts([1, 2], [4]), reward, cfg, make_reference(policy),
                      torch.Generator().manual_seed(0))
    shifted = Groups(g.gen, (g.old_logp - 0.5) * g.gen.response_mask, g.ref_logp, g.rewards, g.advantages,
                     g.all_equal, g.texts)
    stats = grpo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), shifted, cfg,
                        generator=torch.Generator().manual_seed(0))
    adv = g.advantages.tolist()
    by_hand = [-(1.2 * a if a > 0 else math.exp(0.5) * a) for a in adv]  # per token, the same over a response
    assert any(a > 0 for a in adv) and any(a < 0 for a in adv) and stats["clipfrac"] > 0
    assert stats["loss"] == pytest.approx(sum(by_hand) / 8, rel=1e-5)  # minibatches of 4: their mean is the mean

def test_a_bandit_puts_its_mass_on_the_rewarded_token():
    policy = tiny_gpt(8)
    cfg = GRPOConfig(steps=25, prompts_per_step=4, group_size=8, minibatch_size=16, max_new_tokens=1, lr=1e-2,
                     beta=0.0)
    rows = train_grpo(policy, TOK, prompts([1]) * 4, lambda gen, exs: (gen.tokens[:, gen.prompt_len] == 3).float(),
                      cfg, make_reference(policy), progress=False)
    with torch.no_grad():
        p3 = torch.softmax(policy(torch.tensor([[1]]))[0][0, -1], -1)[3].item()
    assert rows[0]["reward"] < 0.3 and p3 > 0.9
    assert rows[-1]["all_equal_groups"] > rows[0]["all_equal_groups"]  # won groups all score 1: no signal left


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_answer_then_stop_at_temperature_0_7(loss_type):
    policy = tiny_gpt(8, seed=3)
    # at lr 1e-2 every response soon starts with 3 and none stops: each group scores 0.5 throughout, no advantage is
    # left, and learning stops (the all-equal groups the log counts); 3e-3 gets through
    cfg = GRPOConfig(steps=30, prompts_per_step=4, group_size=8, minibatch_size=16, max_new_tokens=3,
                     temperature=0.7, lr=3e-3, beta=0.0, loss_type=loss_type)
    # graded as the world's rubric grades: 1 for the answer alone ("3 <eos>"), 0.5 for the answer and more text
    reward = lambda gen, exs: torch.tensor([1.0 if r == [3] and e else 0.5 if r[:1] == [3] else 0.0  # noqa: E731
                                            for r, e in zip(gen.responses(), gen.has_eos.tolist())])
    train_grpo(policy, TOK, prompts([1]) * 4, reward, cfg, make_reference(policy), progress=False)
    with torch.no_grad():
        first = torch.softmax(policy(torch.tensor([[1]]))[0][0, -1] / 0.7, -1)[3]
        then = torch.softmax(policy(torch.tensor([[1, 3]]))[0][0, -1] / 0.7, -1)[EOS]
    assert first * then > 0.8, (first.item(), then.item())


@pytest.mark.parametrize("peft_method", ["none", "lora"])
def test_the_cli_runs_with_full_weights_and_with_lora_whose_reference_is_the_adapters_off(tmp_path, peft_method):
    import json

    from minigpt import CharTokenizer, tasks
    from rlhf import grpo

    rows = [{"instruction": "What is 2 + 3?", "output": "5"}, {"instruction": "What is 7 - 4?", "output": "3"}]
    tok = CharTokenizer.train("".join(tasks.format_prompt(r["instruction"]) for r in rows) + "0123456789 abc,.")
    from rlhf.reward_model import RewardModel, save_reward_model

    save_folder(tmp_path / "sft", tiny_gpt(tok.vocab_size, block_size=64), tok, "sft", template=True)
    save_reward_model(RewardModel(tiny_gpt(tok.vocab_size, block_size=64, seed=1)), tok, tmp_path / "reward")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = grpo.main(["--sft", str(tmp_path / "sft"), "--prompts", str(tmp_path / "prompts.jsonl"), "--out-dir",
                         str(tmp_path / "grpo"), "--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
                         "--minibatch-size", "4", "--max-new-tokens", "4", "--lr", "1e-2", "--no-progress",
                         "--peft", peft_method, "--reward", str(tmp_path / "reward"), "--reward-fn", "both"])
    metrics = [json.loads(line) for line in (tmp_path / "grpo" / "grpo_metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and {"reward", "all_equal_groups", "clipfrac", "kl", "entropy", "response_len",
                                  "truncated", "true_score"} <= set(metrics[0])
    assert metrics[0]["kl"] < 1e-6 < metrics[1]["kl"]  # the first samples come from the reference itself
    assert (tmp_path / "grpo" / "grpo.png").is_file() and results["reward"] == "both"
    from minigpt import checkpoint

    assert checkpoint.load(tmp_path / "grpo").info["stage"] == "grpo"
