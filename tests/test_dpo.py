"""DPO against independent computations: ln 2 when the policy is the reference, the Bradley-Terry loss on the implicit
rewards, summed log-probabilities against unpadded forward passes with the prompt masked, the gradient by hand, a
bandit that reaches the optimum the closed form predicts, on-policy pairs ordered by the checker, and the CLI."""

import math

import pytest
import torch
from conftest import save_folder, tiny_gpt
from test_ppo import EOS, PAD, TOK, prompts

from minigpt.data import labelled_lengths, length_groups
from rlhf.dpo import (
    collate,
    dpo_loss,
    encode_pair,
    encode_text_pairs,
    on_policy_pairs,
    reference_logprobs,
    sequence_logprobs,
)
from rlhf.policy import make_reference
from rlhf.reward_model import bradley_terry_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_loss_is_ln2_when_the_policy_is_the_reference_and_bradley_terry_on_the_implicit_rewards():
    g = torch.Generator().manual_seed(0)
    pi_c, pi_r, ref_c, ref_r = (-10 * torch.rand(6, generator=g) for _ in range(4))
    loss, _ = dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.3)
    r_c, r_r = 0.3 * (pi_c - ref_c), 0.3 * (pi_r - ref_r)
    assert loss.item() == pytest.approx(bradley_terry_loss(r_c, r_r)[0].item(), rel=1e-6)
    by_hand = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(r_c.tolist(), r_r.tolist())) / 6
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert m["rewards_accuracy"].item() == pytest.approx((r_c > r_r).float().mean().item())
    assert m["rewards_margin"].item() == pytest.approx((r_c - r_r).mean().item(), rel=1e-6)
    assert m["logps_chosen"].item() == pytest.approx(pi_c.mean().item(), rel=1e-6)


def test_the_logged_implicit_rewards_and_log_likelihoods_by_hand():
    """rewards/chosen and rewards/rejected are the means of beta (log pi - log pi_ref), logps/rejected the mean of
    log pi(y_r), and a tie is not counted as accurate (trl: chosen > rejected)."""
    pi_c, ref_c = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -1.0, -3.0])
    pi_r, ref_r = torch.tensor([-2.0, -2.0, -3.0]), torch.tensor([-2.5, -1.0, -2.0])
    _, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # implicit rewards: chosen 0.25, -0.5, 0; rejected 0.25, -0.5, -0.5: two ties, one pair ordered right
    assert m["rewards_chosen"].item() == pytest.approx((0.25 - 0.5 + 0) / 3)
    assert m["rewards_rejected"].item() == pytest.approx((0.25 - 0.5 - 0.5) / 3)
    assert m["rewards_accuracy"].item() == pytest.approx(1 / 3)
    assert m["rewards_margin"].item() == pytest.approx(0.5 / 3)
    assert m["logps_rejected"].item() == pytest.approx(-7 / 3)

def test_summed_logprobs_of_a_padded_batch_equal_each_response_alone_with_the_prompt_masked():
    model = tiny_gpt(8).eval()
    pairs = [([1, 2, 3], [4, EOS], [5, 5, 5, EOS]), ([2], [3, 3, 3, 3, EOS], [EOS]), ([4, 4], [1, EOS], [0, EOS])]
    g = torch.Generator().manual_seed(0)
    for _ in range(9):  # 24 rows of 2 to 30 tokens: the batch goes through the model in groups of similar length
        p, c, r = (torch.randint(0, 6, (int(torch.randint(1, n, (1,), generator=g)),), generator=g).tolist()
                   for n in (16, 14, 14))
        pairs.append((p, c + [EOS], r + [EOS]))
    n = len(pairs)
    encoded = [encode_pair(p, c, r, 64, i) for i, (p, c, r) in enumerate(pairs)]
    b = collate(encoded, PAD)
    assert len(length_groups(labelled_lengths(b["labels"]))) >= 2
    with torch.no_grad():
        got = sequence_logprobs(model, b["idx"], b["labels"])
        for k, (p, c, r) in enumerate(pairs):
            for j, resp in enumerate((c, r)):
                seq = torch.tensor([p + resp])
                logp = torch.log_softmax(model(seq)[0][0], -1)
                expected = sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(resp))  # response tokens only
                assert got[j * n + k].item() == pytest.approx(expected.item(), abs=1e-4)


def test_a_prompt_too_long_is_cut_from_the_left_and_a_response_too_long_is_refused():
    tokens, labels, _, _ = encode_pair(list(range(10)), [1, EOS], [2, EOS], block_size=6)  # 6 inputs, 6 labels
    assert tokens == [5, 6, 7, 8, 9, 1] and labels == [-100, -100, -100, -100, 1, EOS]
    with pytest.raises(ValueError, match="pair 3: a response of 7 tokens does not fit the context of 6"):
        encode_pair([1], [1] * 7, [2], block_size=6, index=3)


def test_text_pairs_are_the_templated_prompt_then_each_response_and_its_eos():
    """encode_text_pairs: prompt in the template, then the response and eos, the labels -100 on the prompt only."""
    from minigpt import CharTokenizer, tasks

    tok = CharTokenizer.train(tasks.format_prompt("Say hi.") + "xyz")
    (enc,) = encode_text_pairs(tok, [{"prompt": "Say hi.", "chosen": "x", "rejected": "yz"}], 256, tasks.TEMPLATE)
    prompt = tok.encode(tasks.format_prompt("Say hi."))
    for tokens, labels, response in ((enc[0], enc[1], "x"), (enc[2], enc[3], "yz")):
        full = prompt + tok.encode(response) + [tok.eos_token_id]
        assert tokens == full[:-1] and labels == [-100] * (len(prompt) - 1) + full[len(prompt):]


def test_the_reference_of_a_lora_policy_is_its_base_model_and_the_policy_keeps_its_mode():
    """reference_logprobs with no reference: the adapters off (the base model's sums), the policy left in train mode."""
    import copy

    import peft

    model = tiny_gpt(8)
    base = copy.deepcopy(model).eval()
    peft.get_peft_model(model, peft.LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # B = 0 at first: move the adapters so that the policy is not its base
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    model.train()
    encoded = [encode_pair([1, 2], [3, EOS], [4, 4, EOS], 64)]
    ref = torch.cat(reference_logprobs(model, encoded, PAD))
    assert model.training
    with torch.no_grad():
        policy = sequence_logprobs(model, *collate(encoded, PAD).values())
        for got, own, resp in zip(ref.tolist(), policy.tolist(), ([3, EOS], [4, 4, EOS])):
            logp = torch.log_softmax(base(torch.tensor([[1, 2] + resp]))[0][0], -1)
            expected = sum(logp[1 + t, tok] for t, tok in enumerate(resp)).item()
            assert got == pytest.approx(expected, abs=1e-4) and abs(own - expected) > 1e-2

def test_the_gradient_is_beta_sigmoid_of_minus_the_margin_times_the_difference_of_gradients():
    model = tiny_gpt(8)
    ref = make_reference(model)
    with torch.no_grad():  # the policy a little away from the reference, so the margin is not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    encoded = [encode_pair([1, 2], [3, EOS], [4, 4, EOS], 64)]
    b = collate(encoded, PAD)
    ref_c, ref_r = reference_logprobs(model, encoded, PAD, ref)
    params = list(model.parameters())
    lp = sequence_logprobs(model, b["idx"], b["labels"])
    loss, _ = dpo_loss(lp[:1], lp[1:], ref_c, ref_r, beta=0.5)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    margin = 0.5 * ((lp[0] - ref_c[0]) - (lp[1] - ref_r[0])).item()
    d_chosen = torch.autograd.grad(lp[0], params, retain_graph=True)
    d_rejected = torch.autograd.grad(lp[1], params)
    weight = 0.5 / (1 + math.exp(margin))  # beta sigmoid(-margin)
    for g, c, r in zip(grads, d_chosen, d_rejected):
        torch.testing.assert_close(g, -weight * (c - r), atol=1e-6, rtol=1e-4)


def test_a_bandit_reaches_the_optimum_of_the_closed_form():
    """Responses "3" and "5" after prompt "1"; 3 is preferred in 3 of 4 pairs. At DPO's optimum
    beta [log pi(3)/pi_ref(3) - log pi(5)/pi_ref(5)] = logit(3/4) = ln 3."""
    from minigpt.train import TrainConfig, train

    model = tiny_gpt(8)
    encoded = [encode_pair([1], [3, EOS], [5, EOS], 64)] * 3 + [encode_pair([1], [5, EOS], [3, EOS], 64)]
    ref = reference_logprobs(model, encoded, PAD, make_reference(model))
    beta = 0.5

    def loss_fn(m, batch):
        lp = sequence_logprobs(m, batch["idx"], batch["labels"])
        return dpo_loss(lp[:4], lp[4:], batch["ref"][:4], batch["ref"][4:], beta)

    cfg = TrainConfig(max_iters=300, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_iters=0, weight_decay=0.0,
                      eval_interval=1000, log_interval=1000, out_dir="/tmp/_dpo_bandit", progress=False, plot=False)
    train(model, lambda g: collate(encoded, PAD, ref), loss_fn, cfg)
    with torch.no_grad():
        lp = sequence_logprobs(model.eval(), *collate(encoded[:1], PAD).values())
    shift = (lp[0] - ref[0][0]) - (lp[1] - ref[1][0])  # log pi(3)/pi_ref(3) - log pi(5)/pi_ref(5)
    assert beta * shift.item() == pytest.approx(math.log(3), abs=0.1)


def test_on_policy_pairs_put_the_better_sample_first():
    from minigpt import tasks

    model = tiny_gpt(8, seed=4)
    examples = [dict(p, output="3") for p in prompts([1], [2], [1, 1], [4])]
    pairs, stats = on_policy_pairs(model, TOK, examples, k=8, max_new_tokens=2, temperature=1.5, seed=0)
    assert stats["samples"] == 32 and 0 < len(pairs) <= 4
    for prompt, chosen, rejected in pairs:
        ex = examples[[TOK.encode(e["prompt"]) for e in examples].index(prompt)]
        text = lambda r: TOK.decode([t for t in r if t != EOS])  # noqa: E731
        assert tasks.ground_truth_score(ex, text(chosen)) > tasks.ground_truth_score(ex, text(rejected))


def test_on_policy_pairs_skip_prompts_whose_samples_all_score_the_same():
    """Greedy samples are all alike: no prompt has a better and a worse response, so there is no pair."""
    examples = [dict(p, output="3") for p in prompts([1], [2], [1, 1], [4])]
    pairs, stats = on_policy_pairs(tiny_gpt(8, seed=4), TOK, examples, k=4, max_new_tokens=2, temperature=0.0)
    assert pairs == [] and stats["pairs"] == 0 and stats["samples"] == 16


def test_on_policy_responses_keep_the_eos_they_sampled():
    """A sampled response shorter than max_new_tokens stopped at eos, and the pair keeps that eos (the last token)."""
    examples = [dict(p, output="3") for p in prompts([1], [2], [1, 1], [4])]
    pairs, _ = on_policy_pairs(tiny_gpt(8, seed=4), TOK, examples, k=8, max_new_tokens=2, temperature=1.5, seed=0)
    responses = [r for _, c, rej in pairs for r in (c, rej)]
    assert any(r[-1:] == [EOS] for r in responses)
    for r in responses:
        assert EOS not in r[:-1] and (r[-1:] == [EOS] or len(r) == 2), r

@pytest.mark.parametrize("pairs", ["file", "on_policy"])
def test_the_cli_trains_and_logs_what_trl_logs(tmp_path, pairs):
    import json

    from minigpt import CharTokenizer, checkpoint, tasks
    from rlhf import dpo

    rows = [{"prompt": tasks.format_prompt(f"What is {a} + {b}?"), "chosen": str(a + b), "rejected": f"{a + b} {a}"}
            for a in range(6) for b in range(6)]
    alphabet = "abcdefghijklmnopqrstuvwxyz,.!?ABCDEFGHIJKLMNOPQRSTUVWXYZ-'"
    tok = CharTokenizer.train("".join(r["prompt"] + r["chosen"] + r["rejected"] for r in rows) + alphabet)
    save_folder(tmp_path / "sft", tiny_gpt(tok.vocab_size, block_size=256), tok, "sft", template=True)
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # on-policy pairs need samples the checker scores differently: an empty reference answer gives 1 to stopping at
    # once, 0.5 to a response that starts with a space or a sign, 0 to the rest
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"instruction": f"Say nothing {i}.", "output": ""})
                                                    + "\n" for i in range(24)))
    args = ["--sft", str(tmp_path / "sft"), "--out-dir", str(tmp_path / "dpo"), "--pairs", pairs, "--max-iters", "4",
            "--batch-size", "4", "--eval-interval", "2", "--log-interval", "1", "--eval-pairs", "8", "--lr", "1e-3",
            "--no-progress", "--train-file", str(tmp_path / "prefs.jsonl"), "--on-policy-prompts", "24",
            "--prompts", str(tmp_path / "prompts.jsonl"),
            "--samples-per-prompt", "4", "--temperature", "2.0"]
    results = dpo.main(args)
    metrics = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_rewards_chosen", "train_rewards_rejected", "train_rewards_accuracy", "train_rewards_margin",
            "train_logps_chosen", "train_logps_rejected"} <= set(metrics[-1])
    assert metrics[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # at first the policy is the reference
    last_eval = [m for m in metrics if m["val_loss"] is not None][-1]
    # trained on the chosen over the rejected: the held-out pairs move the same way
    assert last_eval["val_loss"] < math.log(2) and last_eval["val_rewards_margin"] > 0
    assert (tmp_path / "dpo" / "dpo.png").is_file() and results["n_train_pairs"] > 0
    assert checkpoint.load(tmp_path / "dpo").info["stage"] == "dpo"
