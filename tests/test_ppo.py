"""PPO against independent computations: every piece of the rollout and the update written out by hand (both branches
of every clip and max, a temperature other than 1, multi-token responses), one update step against the gradient of
the loss by hand, the KL controller, and bandits whose optimum is known in closed form."""

import copy
import math

import pytest
import torch
from conftest import save_folder, tiny_gpt

from minigpt import engine
from rlhf.policy import kl_penalty, make_reference, response_logits, response_logprobs
from rlhf.ppo import (
    AdaptiveKLController,
    PolicyWithValue,
    PPOConfig,
    gae,
    policy_loss,
    ppo_update,
    rollout,
    train_ppo,
    value_loss,
    whiten,
)

pytestmark = pytest.mark.usefixtures("one_thread")
EOS, PAD = 7, 6


class ToyTokenizer:
    """Token ids written as numbers: "1 2 3" <-> [1, 2, 3]; eos 7, pad 6 (vocabulary 8)."""

    eos_token_id, pad_token_id, vocab_size, name = EOS, PAD, 8, "toy"

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


TOK = ToyTokenizer()


def prompts(*rows):
    return [{"prompt": " ".join(map(str, r))} for r in rows]


def actor_with_values(seed=0):
    """A tiny policy and a value head with non-zero weights, so values are worth checking."""
    actor = PolicyWithValue(tiny_gpt(8, seed=seed))
    with torch.no_grad():
        actor.value_head.weight.normal_(0, 1.0)
        actor.value_head.bias.fill_(0.3)
    return actor


def perturbed(model, scale=0.05, seed=1):
    """A reference that differs from the policy: its KL has a sign to get right."""
    ref = make_reference(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ref


# -- the pieces --------------------------------------------------------------------------------------------------


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


def whiten_by_hand(x, mask):
    vals = [v for row, m in zip(x.tolist(), mask.tolist()) for v, k in zip(row, m) if k]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return torch.tensor([[(v - mean) / std if k else 0.0 for v, k in zip(row, m)]
                         for row, m in zip(x.tolist(), mask.tolist())])


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


def test_logprobs_come_from_the_previous_position_at_the_temperature():
    model = tiny_gpt(8).eval()
    tokens = torch.tensor([[1, 2, 3, 4]])  # prompt [1, 2], response [3, 4]
    with torch.no_grad():
        got = response_logprobs(model(tokens)[0], tokens, prompt_len=2, temperature=0.7)
        p3 = torch.log_softmax(model(torch.tensor([[1, 2]]))[0][0, -1] / 0.7, -1)[3]
        p4 = torch.log_softmax(model(torch.tensor([[1, 2, 3]]))[0][0, -1] / 0.7, -1)[4]
    torch.testing.assert_close(got, torch.stack([p3, p4])[None], atol=1e-5, rtol=0)


def test_logits_and_values_at_the_response_positions_only_are_those_of_the_full_pass():
    """response_logits and PolicyWithValue(..., prompt_len) run the output layer and the value head only at the
    positions P - 1 ... T - 2 that choose the response's tokens; they equal those columns of the full pass, in a
    left-padded batch, and give the same log-probabilities."""
    actor = actor_with_values()
    tokens = torch.tensor([[PAD, PAD, 1, 2, 3, 4, EOS], [5, 1, 2, 3, 4, 5, 1]])  # prompts of 2 and 4 tokens, P = 4
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        full_logits, full_values = actor(tokens, mask)  # (2, 7, V), (2, 7)
        logits, values = actor(tokens, mask, prompt_len=4)  # (2, 3, V), (2, 3)
        ref_logits = response_logits(actor.policy, tokens, mask, 4)
    assert logits.shape == (2, 3, 8) and values.shape == (2, 3)
    torch.testing.assert_close(logits, full_logits[:, 3:6])  # positions 3, 4, 5 choose tokens 4, 5, 6
    torch.testing.assert_close(values, full_values[:, 3:6])
    torch.testing.assert_close(ref_logits, full_logits[:, 3:6])
    torch.testing.assert_close(response_logprobs(logits, tokens, 4, 0.7), response_logprobs(full_logits, tokens, 4, 0.7))
    with pytest.raises(ValueError, match="logits cover 5 positions; expected 7 .* or 3"):
        response_logprobs(full_logits[:, 1:6], tokens, 4, 0.7)  # neither every position nor the response's


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    rho = torch.exp(ref - logp)  # pi_ref / pi
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), rho - 1 - torch.log(rho))
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_the_policy_loss_takes_the_larger_term_in_each_of_the_five_cases():
    eps = 0.2
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1]
    adv = [2.0, 2.0, -1.0, -1.0, 3.0]
    # A > 0, r > 1 + eps: clipped (-2 * 1.2); A > 0, r < 1 - eps: unclipped (-2 * 0.5); A < 0, r > 1 + eps:
    # unclipped (1 * 1.5); A < 0, r < 1 - eps: clipped (1 * 0.8); inside the range: both equal (-3 * 1.1)
    expected = [-2.4, -1.0, 1.5, 0.8, -3.3]
    logp = torch.log(torch.tensor([ratios]))
    loss, clipfrac, ratio = policy_loss(logp, torch.zeros(1, 5), torch.tensor([adv]), torch.ones(1, 5), eps)
    assert loss.item() == pytest.approx(sum(expected) / 5)
    assert clipfrac.item() == pytest.approx(2 / 5)
    torch.testing.assert_close(ratio, torch.tensor([ratios]))
    # masked tokens count for nothing: the mean is over the real ones
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    assert policy_loss(logp, torch.zeros(1, 5), torch.tensor([adv]), mask, eps)[0].item() == pytest.approx(-3.4 / 2)


def test_the_value_loss_takes_the_larger_term_in_both_branches():
    values, old = torch.tensor([[1.0, 0.0, 0.6]]), torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[0.0, 1.0, 0.0]])
    # token 1: (1 - 0)^2 = 1 vs clipped V 0.7: 0.49 -> 1; token 2: (0 - 1)^2 = 1 vs clipped 0.3: 0.49 -> 1;
    # token 3: (0.6 - 0)^2 = 0.36 vs clipped 0.6 (inside): 0.36. Now one where the clipped term is larger:
    loss, frac = value_loss(values, old, returns, torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx(0.5 * (1 + 1 + 0.36) / 3) and frac.item() == 0.0
    v, o, r = torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.tensor([[0.1]])  # V moved toward R past the clip
    loss, frac = value_loss(v, o, r, torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.8 - 0.1) ** 2) and frac.item() == 1.0  # clipped V = 0.8


def test_whitening_by_hand_with_and_without_the_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(whiten(x, mask), whiten_by_hand(x, mask), atol=1e-5, rtol=0)
    mean = 2.5  # of 1, 2, 3, 4
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), (whiten_by_hand(x, mask) + mean) * mask,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kl, factor", [(12.0, 1 + 0.2 * 100 / 1000), (7.2, 1 + 0.2 * 100 / 1000),
                                        (6.6, 1 + 0.1 * 100 / 1000), (6.0, 1.0), (5.4, 1 - 0.1 * 100 / 1000),
                                        (0.6, 1 - 0.2 * 100 / 1000)], ids=["far above", "above, clipped", "above",
                                                                          "at target", "below", "far below"])
def test_the_kl_controller_below_at_and_above_its_target(kl, factor):
    c = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert c.update(kl, 100) == pytest.approx(0.1 * factor, rel=1e-12)


def test_the_default_controller_can_halve_or_double_beta_within_a_run():
    cfg = PPOConfig()
    up, down = (AdaptiveKLController(1.0, cfg.target_kl, cfg.horizon) for _ in range(2))
    for _ in range(30):  # the pipeline's 30 steps of 64
        up.update(2 * cfg.target_kl, 64)
        down.update(0.0, 64)
    assert up.beta > 2.0 and down.beta < 0.5


# -- the rollout -----------------------------------------------------------------------------------------------


def test_rollout_bookkeeping_equals_each_row_computed_alone():
    """Masks, log-probabilities at temperature 0.7, values, KL (with its sign) and the score at the last response
    token, each against an unpadded forward pass of that row alone."""
    torch.manual_seed(0)
    actor = actor_with_values()
    ref = perturbed(actor.policy)
    cfg = PPOConfig(batch_size=8, minibatch_size=4, max_new_tokens=5, temperature=0.7, missing_eos_penalty=0.75)
    batch = prompts([1, 2, 3], [4], [2, 2], [5, 1, 1, 1], [3], [1, 4], [0, 2, 5], [4, 4])
    raw = torch.arange(8, dtype=torch.float) / 4  # row b's reward: b / 4
    ro = rollout(actor, batch, TOK, lambda gen, exs: raw.clone(), cfg, beta=0.3, ref_model=ref,
                 generator=torch.Generator().manual_seed(1))
    ended = ro.has_eos.tolist()
    assert any(ended) and not all(ended), "the sample should hold rows with and without an eos"
    P, beta = ro.prompt_len, 0.3
    for b, ex in enumerate(batch):
        prompt = TOK.encode(ex["prompt"])
        response = ro.tokens[b, P:].tolist()
        n = response.index(EOS) + 1 if EOS in response else len(response)
        assert ro.response_mask[b].tolist() == [1.0] * n + [0.0] * (len(response) - n)
        seq = torch.tensor([prompt + response[:n]])
        with torch.no_grad():
            logits, values = actor(seq, torch.ones_like(seq))
            ref_logits = ref(seq)[0]
        idx = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)  # the position before each response token
        tok = torch.tensor(response[:n])
        logp = torch.log_softmax(logits[0, idx] / 0.7, -1)[torch.arange(n), tok]
        ref_logp = torch.log_softmax(ref_logits[0, idx] / 0.7, -1)[torch.arange(n), tok]
        torch.testing.assert_close(ro.logprobs[b, :n], logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ro.ref_logprobs[b, :n], ref_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ro.values[b, :n], values[0, idx], atol=1e-5, rtol=0)
        score = raw[b].item() - (0.0 if ended[b] else 0.75)  # the penalty is taken off, never added
        assert ro.scores[b].item() == pytest.approx(score)
        expected = -beta * (logp - ref_logp)
        expected[n - 1] += score
        torch.testing.assert_close(ro.rewards[b, :n], expected, atol=1e-5, rtol=0)
        assert (ro.rewards[b, n:] == 0).all() and (ro.logprobs[b, n:] == 0).all() and (ro.values[b, n:] == 0).all()


def test_whitened_rewards_have_unit_variance_and_keep_their_mean():
    torch.manual_seed(0)
    actor = actor_with_values()
    batch = prompts([1, 2], [3], [4, 5, 1], [2])
    kwargs = dict(tokenizer=TOK, reward_fn=lambda gen, exs: torch.tensor([1.0, -2.0, 0.5, 3.0]), beta=0.1,
                  ref_model=perturbed(actor.policy))
    plain = rollout(actor, batch, cfg=PPOConfig(batch_size=4, minibatch_size=2, max_new_tokens=4),
                    generator=torch.Generator().manual_seed(0), **kwargs)
    white = rollout(actor, batch, cfg=PPOConfig(batch_size=4, minibatch_size=2, max_new_tokens=4, whiten_rewards=True),
                    generator=torch.Generator().manual_seed(0), **kwargs)
    m = plain.response_mask
    mean = plain.rewards[m.bool()].mean()
    torch.testing.assert_close(white.rewards, (whiten_by_hand(plain.rewards, m) + mean) * m, atol=1e-5, rtol=0)


def test_first_minibatch_ratio_is_one_and_kl_to_an_identical_reference_is_zero():
    torch.manual_seed(0)
    actor = actor_with_values()
    ref = make_reference(actor.policy)
    cfg = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=5, temperature=0.7)
    ro = rollout(actor, prompts([1, 2, 3], [4], [2, 2], [5, 1, 1, 1]) * 2, TOK, lambda g, e: torch.randn(8), cfg,
                 beta=0.1, ref_model=ref, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ro.kl, torch.zeros_like(ro.kl))
    opt = torch.optim.SGD(actor.policy.parameters(), lr=0.1)
    vf_opt = torch.optim.SGD(actor.value_head.parameters(), lr=0.1)
    stats = ppo_update(actor, opt, vf_opt, ro, cfg, torch.Generator().manual_seed(0))
    assert stats["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["ratio"] != 1.0  # later minibatches see the updated policy


# -- the update ------------------------------------------------------------------------------------------------


def loss_by_hand(actor, ro, cfg):
    """PPO's loss on the whole rollout written out: advantages by the backward loop and whitening by hand, the
    clipped policy loss and the clipped value loss as means over all response tokens."""
    m = ro.response_mask
    adv, ret = gae_by_hand(ro.rewards.tolist(), ro.values.tolist(), m.tolist(), cfg.gamma, cfg.lam)
    adv = whiten_by_hand(adv, m)
    h = actor.policy.hidden_states(ro.tokens, attention_mask=ro.attention_mask)  # (B, T, C)
    logits = actor.policy.output_layer(h)
    values = actor.value_head(actor.policy.output_layer.ln_f(h).detach()).squeeze(-1)  # the critic sends no gradient
    P = ro.prompt_len
    logp = torch.log_softmax(logits[:, P - 1 : -1] / cfg.temperature, -1).gather(-1, ro.tokens[:, P:, None])[..., 0]
    ratio = torch.exp(logp - ro.logprobs)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
    v = values[:, P - 1 : -1]
    v_clipped = ro.values + (v - ro.values).clamp(-cfg.cliprange_value, cfg.cliprange_value)
    v_loss = 0.5 * torch.maximum((v - ret) ** 2, (v_clipped - ret) ** 2)
    return (per_token * m).sum() / m.sum(), (v_loss * m).sum() / m.sum()


@pytest.mark.parametrize("max_grad_norm", [1e6, 0.05], ids=["unclipped", "clipped"])
def test_one_update_step_is_minus_lr_times_the_gradient_of_the_loss_by_hand(max_grad_norm):
    torch.manual_seed(0)
    actor = actor_with_values()
    cfg = PPOConfig(batch_size=6, minibatch_size=6, ppo_epochs=1, max_new_tokens=5, temperature=0.8,
                    max_grad_norm=max_grad_norm, gamma=0.95, lam=0.9)
    ro = rollout(actor, prompts([1, 2], [3, 3, 1], [4], [2, 5], [0], [1, 1, 1]), TOK,
                 lambda g, e: torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, 0.0]), cfg, beta=0.2,
                 ref_model=perturbed(actor.policy), generator=torch.Generator().manual_seed(2))
    by_hand = copy.deepcopy(actor).train()
    pg, vf = loss_by_hand(by_hand, ro, cfg)
    by_hand.zero_grad()
    (pg + vf).backward()
    lr = 0.5
    expected = {}
    for group in (by_hand.policy, by_hand.value_head):  # each set of tensors clipped on its own
        params = list(group.named_parameters())
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for _, p in params)).item()
        scale = min(1.0, max_grad_norm / (norm + 1e-6))
        expected.update({(id(group), n): p.detach() - lr * scale * p.grad for n, p in params})
    opt = torch.optim.SGD(actor.policy.parameters(), lr=lr)
    vf_opt = torch.optim.SGD(actor.value_head.parameters(), lr=lr)
    ppo_update(actor, opt, vf_opt, ro, cfg, torch.Generator().manual_seed(0))
    for mine, theirs in ((actor.policy, by_hand.policy), (actor.value_head, by_hand.value_head)):
        for n, p in mine.named_parameters():
            torch.testing.assert_close(p.detach(), expected[(id(theirs), n)], atol=2e-6, rtol=1e-4)


# -- the whole loop ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_bandit_reaches_the_kl_regularised_optimum(beta):
    """One-token responses, reward 1 for token 3. The maximiser of E[r] - beta KL(pi || pi_ref) is
    pi*(a) = pi_ref(a) exp(r(a) / beta) / Z: with beta = 0 all mass on token 3; with beta = 1 only a tilt."""
    policy = tiny_gpt(8)
    ref = make_reference(policy)
    prompt = torch.tensor([[1]])
    with torch.no_grad():
        p_ref = torch.softmax(ref(prompt)[0][0, -1], -1)
    target = (p_ref[3] * math.e / (p_ref[3] * math.e + 1 - p_ref[3])).item() if beta else 1.0
    cfg = PPOConfig(steps=40 if beta else 25, batch_size=64, minibatch_size=32, ppo_epochs=4, max_new_tokens=1,
                    lr=1e-2, beta=beta)
    reward = lambda gen, exs: (gen.tokens[:, gen.prompt_len] == 3).float()  # noqa: E731
    train_ppo(policy, TOK, prompts([1]) * 64, reward, cfg, ref_model=ref, progress=False)
    with torch.no_grad():
        p3 = torch.softmax(policy(prompt)[0][0, -1], -1)[3].item()
    assert p_ref[3] < 0.3  # the reward is not already won
    if beta == 0:
        assert p3 > 0.95
    else:
        assert abs(p3 - target) < 0.1, (p3, target, p_ref[3].item())


def test_a_two_token_bandit_at_temperature_0_7_learns_to_answer_then_stop():
    """Reward 1 for the response "3 <eos>" and nothing else, a penalty for never stopping: PPO must place the
    score at the eos, credit the first token through the value and the advantages, and sample at the temperature."""
    policy = tiny_gpt(8, seed=3)
    cfg = PPOConfig(steps=30, batch_size=64, minibatch_size=32, max_new_tokens=3, temperature=0.7, lr=1e-2, beta=0.0,
                    vf_lr=1e-2, missing_eos_penalty=1.0)
    reward = lambda gen, exs: torch.tensor([float(r == [3]) for r in gen.responses()])  # noqa: E731
    rows = train_ppo(policy, TOK, prompts([1]) * 64, reward, cfg, ref_model=make_reference(policy), progress=False)[1]
    with torch.no_grad():
        first = torch.softmax(policy(torch.tensor([[1]]))[0][0, -1] / 0.7, -1)[3]
        then = torch.softmax(policy(torch.tensor([[1, 3]]))[0][0, -1] / 0.7, -1)[EOS]
    assert rows[0]["score"] < 0.1 and first * then > 0.8, (rows[0]["score"], first.item(), then.item())


def test_beta_follows_the_controller_on_the_logged_kl():
    policy = tiny_gpt(8)
    cfg = PPOConfig(steps=4, batch_size=8, minibatch_size=8, ppo_epochs=1, max_new_tokens=3, lr=1e-2, beta=0.5,
                    adaptive_kl=True, target_kl=0.01, horizon=16)
    rows = train_ppo(policy, TOK, prompts([1], [2, 3]) * 4, lambda g, e: torch.zeros(g.tokens.size(0)), cfg,
                     ref_model=perturbed(policy, scale=0.3), progress=False)[1]
    for a, b in zip(rows, rows[1:]):
        error = max(-0.2, min(0.2, a["kl"] / 0.01 - 1))
        assert b["beta"] == pytest.approx(a["beta"] * (1 + error * 8 / 16))
    assert rows[-1]["beta"] > rows[0]["beta"]  # the KL (a per-response sum) is above the target


def test_learning_rates_anneal_and_the_value_head_trains_at_its_own():
    policy = tiny_gpt(8)
    start = [p.detach().clone() for p in policy.parameters()]
    cfg = PPOConfig(steps=4, batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=2, lr=1e-9, vf_lr=0.1,
                    anneal_lr=True)
    actor, rows = train_ppo(policy, TOK, prompts([1]) * 8, lambda g, e: torch.ones(g.tokens.size(0)), cfg,
                            ref_model=make_reference(policy), progress=False)
    assert [r["lr"] for r in rows] == pytest.approx([1e-9 * (1 - s / 4) for s in range(4)])
    policy_moved = max((p - s).abs().max().item() for p, s in zip(policy.parameters(), start))
    head_moved = max(p.abs().max().item() for p in actor.value_head.parameters())  # it starts at zero
    assert policy_moved < 1e-6 and head_moved > 0.05


def test_normalisation_scales_the_rewards_of_samples_drawn_as_ppo_draws_them():
    from rlhf.reward_model import RewardModel, normalize_on_samples

    rm = RewardModel(tiny_gpt(8, seed=1)).eval()
    policy = tiny_gpt(8, seed=2)
    texts = ["1 2", "3", "4 4 1"] * 4
    stats = normalize_on_samples(rm, policy, TOK, texts, max_new_tokens=4, temperature=0.7, seed=5)
    assert stats["n"] == 12 and (stats["temperature"], stats["max_new_tokens"]) == (0.7, 4)
    gen = engine.complete(policy, [TOK.encode(t) for t in texts], 4, EOS, PAD, temperature=0.7,
                          generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # each sample scored alone, unpadded, without an eos it did not sample
        r = torch.tensor([rm(torch.tensor([TOK.encode(t) + resp + ([EOS] if eos else [])])).item()
                          for t, resp, eos in zip(texts, gen.responses(), gen.has_eos.tolist())])
    assert r.mean().item() == pytest.approx(0.0, abs=1e-5) and r.std(correction=0).item() == pytest.approx(1.0, 1e-4)


def test_cli_trains_from_saved_models_with_each_reward_and_refuses_another_tokenizer(tmp_path):
    import json

    from minigpt import GPT, CharTokenizer, preset, tasks
    from rlhf import ppo
    from rlhf.prompts import read_prompts
    from rlhf.reward_model import RewardModel, save_reward_model

    rows = [{"instruction": "What is 2 + 3?", "output": "5"}, {"instruction": "What is 7 - 4?", "output": "3"}]
    tok = CharTokenizer.train("".join(tasks.format_prompt(r["instruction"]) for r in rows) + "0123456789 abc,.")
    save_folder(tmp_path / "sft", GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=64)), tok, "sft",
                template=True)
    save_reward_model(RewardModel(GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=64))), tok,
                      tmp_path / "reward")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--sft", str(tmp_path / "sft"), "--reward", str(tmp_path / "reward"), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--steps", "2", "--batch-size", "2", "--minibatch-size", "1",
            "--max-new-tokens", "4", "--normalize-samples", "4", "--no-progress"]
    for reward in ("reward_model", "checker", "both"):
        out = tmp_path / reward
        results = ppo.main(args + ["--out-dir", str(out), "--reward-fn", reward])
        assert {"ppo_metrics.jsonl", "ppo.png", "model.json", "results.json"} <= {p.name for p in out.iterdir()}
        metrics = [json.loads(line) for line in (out / "ppo_metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [0, 1] and results["reward"] == reward
        assert ("normalization" in results) == (reward != "checker") or reward == "checker"
    # each instruction is put in the SFT model's template; "output" travels along for the checker
    assert read_prompts(tmp_path / "prompts.jsonl", tasks.TEMPLATE)[0] == dict(
        rows[0], prompt=tasks.format_prompt("What is 2 + 3?"))
    other = CharTokenizer.train("".join(tasks.format_prompt(r["instruction"]) for r in rows) + "0123456789 abc,.!?")
    save_reward_model(RewardModel(GPT(preset("tiny", vocab_size=other.vocab_size, block_size=64))), other,
                      tmp_path / "reward_other")
    with pytest.raises(ValueError, match="tokenizer"):
        ppo.main(args[:3] + [str(tmp_path / "reward_other")] + args[4:] + ["--out-dir", str(tmp_path / "x")])
