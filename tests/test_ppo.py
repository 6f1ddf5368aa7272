"""PPO's pieces against hand computations, and PPO itself on a bandit whose optimum is known in closed form."""

import math
from types import SimpleNamespace

import pytest
import torch

from minigpt import GPT, preset
from rlhf.ppo import (
    AdaptiveKLController,
    PolicyWithValue,
    PPOConfig,
    gae,
    kl_penalty,
    make_reference,
    policy_loss,
    ppo_update,
    response_logprobs,
    rollout,
    train_ppo,
    value_loss,
    whiten,
)

TOK = SimpleNamespace(eos_token_id=7, pad_token_id=6)


def gae_by_hand(rewards, values, mask, gamma, lam):
    """The textbook backward recursion on plain Python lists, one sequence at a time."""
    out_adv, out_ret = [], []
    for r, v, m in zip(rewards, values, mask):
        n = int(sum(m))  # real steps; the rest is padding after the end
        adv = [0.0] * len(r)
        last = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_v - v[t]
            last = delta + gamma * lam * last
            adv[t] = last
        out_adv.append(adv)
        out_ret.append([a + (v[t] if t < n else 0.0) for t, a in enumerate(adv)])
    return torch.tensor(out_adv), torch.tensor(out_ret)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_equals_the_backward_loop(gamma, lam):
    rewards = [[0.1, -0.2, 0.0, 1.5], [0.3, 0.0, 2.0, 0.0], [-1.0, 0.5, 0.25, -0.5]]
    values = [[0.5, 0.2, -0.1, 0.7], [0.0, 0.4, 0.9, 9.9], [1.0, 1.0, 1.0, 1.0]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]  # responses of 4, 3 and 2 tokens
    adv, ret = gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask, dtype=torch.float), gamma, lam)
    exp_adv, exp_ret = gae_by_hand(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, exp_adv)
    torch.testing.assert_close(ret, exp_ret)
    # gamma = lam = 1 with zero values: the advantage is the sum of the rewards still to come
    adv, _ = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3), torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[6.0, 5.0, 3.0]]))


def test_logprobs_come_from_the_previous_position():
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=8)).eval()
    tokens = torch.tensor([[1, 2, 3, 4]])  # prompt [1, 2], response [3, 4]
    with torch.no_grad():
        logits, _ = model(tokens)
        got = response_logprobs(logits, tokens, prompt_len=2, temperature=0.7)
        # by hand: p(3 | 1 2) from a forward on [1, 2]; p(4 | 1 2 3) from a forward on [1, 2, 3]
        p3 = torch.log_softmax(model(torch.tensor([[1, 2]]))[0][0, -1] / 0.7, -1)[3]
        p4 = torch.log_softmax(model(torch.tensor([[1, 2, 3]]))[0][0, -1] / 0.7, -1)[4]
    torch.testing.assert_close(got, torch.stack([p3, p4])[None], atol=1e-5, rtol=0)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    rho = torch.exp(ref - logp)  # pi_ref / pi
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), rho - 1 - torch.log(rho))
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_clipped_losses_equal_their_formulas():
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    old = torch.zeros(1, 3)  # ratios 1.5, 0.5, 1.0
    adv = torch.tensor([[2.0, -1.0, 3.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac, _ = policy_loss(logp, old, adv, mask, 0.2)
    # token 1: max(-2 * 1.5, -2 * 1.2) = -2.4 (clipped); token 2: max(1 * 0.5, 1 * 0.8) = 0.8 (clipped);
    # token 3: max(-3, -3) = -3 (not clipped)
    assert loss.item() == pytest.approx((-2.4 + 0.8 - 3.0) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    values, old_v, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    # token 1: V - R = 1 -> 1; clipped V = 0.5 + 0.2 = 0.7 -> 0.49; max 1. token 2: 1 and 1 -> 1
    assert value_loss(values, old_v, returns, torch.ones(1, 2), 0.2).item() == pytest.approx(0.5 * (1 + 1) / 2)
    w = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(w, torch.tensor([[-1.2247, 0.0, 1.2247, 0.0]]), atol=1e-4, rtol=0)


def test_adaptive_kl_controller_moves_beta_the_right_way():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))  # too much KL: beta up (clipped)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000))  # too little: beta down
    assert c.update(6.0, 100) == pytest.approx(c.beta)


def test_first_minibatch_ratio_is_one_and_kl_to_an_identical_reference_is_zero():
    torch.manual_seed(0)
    policy = GPT(preset("tiny", vocab_size=8))
    ref = make_reference(policy)
    actor = PolicyWithValue(policy)
    cfg = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=5)
    prompts = [[1, 2, 3], [4], [2, 2], [5, 1, 1, 1]] * 2
    ro = rollout(actor, prompts, TOK, lambda t, a, p, m: torch.randn(len(t)), cfg, beta=0.1, ref_model=ref,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(ro.kl, torch.zeros_like(ro.kl))
    opt = torch.optim.SGD(actor.parameters(), lr=0.1)
    stats = ppo_update(actor, opt, ro, cfg, torch.Generator().manual_seed(0))
    assert stats["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["ratio"] != 1.0  # later minibatches see the updated policy


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_bandit_reaches_the_kl_regularised_optimum(beta):
    """One-token responses, reward 1 for token 3. The maximiser of E[r] - beta KL(pi || pi_ref) is
    pi*(a) = pi_ref(a) exp(r(a) / beta) / Z: with beta = 0 all mass on token 3; with beta = 1 only a tilt."""
    torch.manual_seed(0)
    policy = GPT(preset("tiny", vocab_size=8))
    ref = make_reference(policy)
    prompt = torch.tensor([[1]])
    with torch.no_grad():
        p_ref = torch.softmax(ref(prompt)[0][0, -1], -1)
    target = (p_ref[3] * math.e / (p_ref[3] * math.e + 1 - p_ref[3])).item() if beta else 1.0
    cfg = PPOConfig(steps=40 if beta else 25, batch_size=64, minibatch_size=32, ppo_epochs=4, max_new_tokens=1,
                    lr=1e-2, beta=beta, vf_coef=0.5)
    reward = lambda tokens, attn, P, m: (tokens[:, P] == 3).float()  # noqa: E731
    train_ppo(policy, TOK, [[1]] * 64, reward, cfg, ref_model=ref, progress=False)
    with torch.no_grad():
        p3 = torch.softmax(policy(prompt)[0][0, -1], -1)[3].item()
    assert p_ref[3] < 0.3  # the reward is not already won
    if beta == 0:
        assert p3 > 0.95
    else:
        assert abs(p3 - target) < 0.1, (p3, target, p_ref[3].item())


def test_cli_trains_from_saved_models_and_refuses_another_tokenizer(tmp_path):
    import json

    from minigpt import CharTokenizer
    from minigpt.train import save_checkpoint
    from rlhf import ppo
    from rlhf.reward_model import RewardModel, save_reward_model

    prompts = ["What is 2 + 3?", "Reverse the list: cat, sun", "Where did Tom go?", "What is 7 - 4?"]
    tok = CharTokenizer.train("".join(prompts) + "0123456789 abcdefghijklmnopqrstuvwxyz,.")
    torch.manual_seed(0)
    sft = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=64))
    save_checkpoint(tmp_path / "sft.pt", {"model": sft.state_dict(), "model_config": sft.config.to_dict(),
                                          "tokenizer": tok.to_dict(), "stage": "sft"})
    save_reward_model(RewardModel(GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=64))), tok,
                      tmp_path / "reward.pt")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "ppo"
    args = ["--sft", str(tmp_path / "sft.pt"), "--reward", str(tmp_path / "reward.pt"), "--prompts",
            str(tmp_path / "prompts.txt"), "--out-dir", str(out), "--steps", "2", "--batch-size", "4",
            "--minibatch-size", "2", "--max-new-tokens", "4", "--no-progress"]
    rows = ppo.main(args)
    assert len(rows) == 2 and {"ppo_metrics.jsonl", "ppo.png", "policy.pt"} <= {p.name for p in out.iterdir()}
    assert [json.loads(line)["step"] for line in (out / "ppo_metrics.jsonl").read_text().splitlines()] == [0, 1]

    other = CharTokenizer.train("".join(prompts) + "0123456789 abcdefghijklmnopqrstuvwxyz,.!?")
    save_reward_model(RewardModel(GPT(preset("tiny", vocab_size=other.vocab_size, block_size=64))), other,
                      tmp_path / "reward_other.pt")
    with pytest.raises(SystemExit, match="tokenizer"):
        ppo.main(args[:3] + [str(tmp_path / "reward_other.pt")] + args[4:])
    assert ppo.read_prompts(tmp_path / "prompts.txt") == prompts


@pytest.mark.parametrize("vf_lr", [None, 0.1])
def test_value_head_trains_at_its_own_learning_rate(vf_lr):
    torch.manual_seed(0)
    policy = GPT(preset("tiny", vocab_size=8))
    start = [p.detach().clone() for p in policy.parameters()]
    cfg = PPOConfig(steps=1, batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=2, lr=1e-9, vf_lr=vf_lr)
    actor, _ = train_ppo(policy, TOK, [[1]] * 8, lambda t, a, P, m: torch.ones(len(t)), cfg,
                         ref_model=make_reference(policy), progress=False)
    policy_moved = max((p - s).abs().max().item() for p, s in zip(policy.parameters(), start))
    head_moved = max(p.abs().max().item() for p in actor.value_head.parameters())  # it starts at zero
    assert policy_moved < 1e-6  # AdamW moves a weight by about lr per step
    assert head_moved < 1e-6 if vf_lr is None else head_moved > 0.05
