"""Reward model: the Bradley-Terry loss against the formula by hand, reading the reward at the last real token,
normalisation, truncation, saving and loading, PEFT backbones, and a short training run on the built-in pairs."""

import json
import math
import statistics

import pytest
import torch
from conftest import save_folder

import peft
import rlhf.reward_model
from minigpt import GPT, CharTokenizer, checkpoint, engine, preset, tasks
from minigpt.checkpoint import save_checkpoint
from minigpt.data import length_groups
from minigpt.train import TrainConfig
from rlhf.preferences import collate_pairs, encode_pairs, encode_response, read_pairs
from rlhf.reward_model import (
    RewardModel,
    bradley_terry_loss,
    load_reward_model,
    main,
    make_reward_model,
    normalize,
    pair_loss,
    pair_metrics,
    pair_rewards,
    reference_batches,
    save_reward_model,
    score_pairs,
    train_reward_model,
    value_head,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs():
    return tasks.preference_pairs(seed=0, n_train=1000, n_test=200)


@pytest.fixture(scope="module")
def tok(pairs):
    prompts = [ex["prompt"] for ex in tasks.ppo_prompts(seed=0, n_train=0, n_test=20)[1]]
    text = "".join(p["prompt"] + p["chosen"] + p["rejected"] for p in pairs[0] + pairs[1]) + "".join(prompts)
    return CharTokenizer.train(text)


def tiny_rm(tok, seed=0, block_size=64):
    torch.manual_seed(seed)
    return RewardModel(GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=block_size))).eval()


def hand_nll(d):
    """-log sigmoid(d) = log(1 + exp(-d)), written so that math.exp never overflows."""
    return math.log1p(math.exp(-d)) if d >= 0 else -d + math.log1p(math.exp(d))


def ln_f_output(gpt, idx, attention_mask=None):
    """LN_f(h_n) captured from GPT.forward itself (a hook on ln_f): an independent path to the hidden states."""
    seen = []
    handle = gpt.output_layer.ln_f.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        gpt(idx, attention_mask=attention_mask)
    handle.remove()
    return seen[0]


# -- the loss -------------------------------------------------------------------------------------------------


def test_loss_and_accuracy_match_the_formula_by_hand():
    rc, rr = [1.5, -0.3, 2.0, 0.2], [0.5, 0.7, 2.0, -1.0]
    loss, acc = bradley_terry_loss(torch.tensor(rc), torch.tensor(rr))
    want = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(rc, rr)) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert acc.item() == pytest.approx(2 / 4)  # the tie 2.0 vs 2.0 is not a win

    margin, coef = [0.5, 0.0, 1.0, 0.25], 0.1
    loss, _ = bradley_terry_loss(torch.tensor(rc), torch.tensor(rr), torch.tensor(margin), center_coef=coef)
    want = sum(-math.log(1 / (1 + math.exp(-(c - r - m)))) for c, r, m in zip(rc, rr, margin)) / 4
    want += coef * sum((c + r) ** 2 for c, r in zip(rc, rr)) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_extreme_differences_stay_finite_with_the_right_limits():
    rc = torch.tensor([100.0, -100.0], requires_grad=True)
    rr = torch.tensor([0.0, 0.0], requires_grad=True)
    for i, d in enumerate([100.0, -100.0]):
        loss, _ = bradley_terry_loss(rc[i : i + 1], rr[i : i + 1])
        assert math.isfinite(loss.item())
        assert loss.item() == pytest.approx(hand_nll(d), rel=1e-6, abs=1e-30)  # ~0 for +100, ~100 for -100
    loss, _ = bradley_terry_loss(rc, rr)
    loss.backward()
    assert torch.isfinite(rc.grad).all() and torch.isfinite(rr.grad).all()
    # d loss / d r_c = -(1 - sigmoid(d)) / B: ~0 when the pair is already won by 100, -1/2 when lost by 100
    assert rc.grad[0].item() == pytest.approx(0.0, abs=1e-30)
    assert rc.grad[1].item() == pytest.approx(-0.5, rel=1e-6)
    assert rr.grad[1].item() == pytest.approx(0.5, rel=1e-6)


def test_gradient_pushes_chosen_up_and_rejected_down():
    rc = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    rr = torch.tensor([0.1, 0.5, 2.5], requires_grad=True)
    loss, _ = bradley_terry_loss(rc, rr)
    loss.backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()  # gradient descent raises r_c and lowers r_r
    for i, d in enumerate((rc - rr).tolist()):
        by_hand = -(1 - 1 / (1 + math.exp(-d))) / 3
        assert rc.grad[i].item() == pytest.approx(by_hand, rel=1e-5)
        assert rr.grad[i].item() == pytest.approx(-by_hand, rel=1e-5)


def test_bad_shapes_and_negative_center_coef_are_refused():
    with pytest.raises(ValueError, match=r"shape \(B,\), got \(3,\) and \(2,\)"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="center_coef must be >= 0, got -1"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), center_coef=-1)


# -- reading the reward -------------------------------------------------------------------------------------------


def test_reward_is_read_at_the_last_real_token_wherever_the_padding_is(tok):
    rm = tiny_rm(tok)
    tokens = encode_response(tok, "### Instruction:\nWhat is 2 + 3?\n### Response:\n", "5", 64)
    n, pad = len(tokens), tok.pad_token_id
    plain = torch.tensor([tokens])
    right = torch.tensor([tokens + [pad] * 4])
    left = torch.tensor([[pad] * 4 + tokens])
    ones, zeros = [1] * n, [0] * 4
    with torch.no_grad():
        r_plain = rm(plain)
        r_none_mask = rm(plain, torch.tensor([ones]))
        r_right = rm(right, torch.tensor([ones + zeros]))
        r_left = rm(left, torch.tensor([zeros + ones]))
        r_other_pad = rm(torch.tensor([tokens + [7, 3, 11, 0]]), torch.tensor([ones + zeros]))
        r_other_left = rm(torch.tensor([[5, 9, 2, 1] + tokens]), torch.tensor([zeros + ones]))
    for r in (r_none_mask, r_right, r_left, r_other_pad, r_other_left):
        assert torch.allclose(r, r_plain, atol=1e-5)
    # independently: w . LN_f(h_n)[last token] + b with LN_f(h_n) taken from GPT.forward on the unpadded sequence
    h = ln_f_output(rm.backbone, plain)[0, -1]  # (C,)
    by_hand = sum(w * x for w, x in zip(rm.head.weight[0].tolist(), h.tolist())) + rm.head.bias.item()
    assert r_plain.item() == pytest.approx(by_hand, abs=1e-5)


def test_a_mixed_batch_scores_each_row_as_alone(tok):
    rm = tiny_rm(tok)
    rows = [encode_response(tok, "### Instruction:\nWhat is 1 + 1?\n### Response:\n", r, 64) for r in ("2", "3 3 3")]
    batch = collate_pairs([(rows[0], rows[1], 0.0)], tok.pad_token_id)
    assert batch["idx"].shape == (2, max(map(len, rows))) and batch["attention_mask"].sum(1).tolist() == [
        len(rows[0]), len(rows[1])]
    with torch.no_grad():
        together = rm(batch["idx"], batch["attention_mask"])
        alone = torch.cat([rm(torch.tensor([r])) for r in rows])
    assert torch.allclose(together, alone, atol=1e-5)


def test_pairs_scored_in_passes_by_length_equal_each_row_alone_and_train_alike(tok, pairs):
    rm = tiny_rm(tok, block_size=128)
    encoded = encode_pairs(tok, pairs[0][:24], rm.block_size)
    batch = collate_pairs(encoded, tok.pad_token_id)  # 48 rows: several passes
    lengths = batch["attention_mask"].sum(1)
    assert len(length_groups(lengths)) >= 2 and lengths.min() < lengths.max() - 10
    rewards = pair_rewards(rm, batch)
    rows = [c for c, _, _ in encoded] + [r for _, r, _ in encoded]
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([row])) for row in rows])
    assert torch.allclose(rewards, alone, atol=1e-5)  # each reward at its own row, in the batch's order
    params = [p for p in rm.parameters() if p.requires_grad]
    loss, _ = pair_loss(rm, batch)
    one_pass = rm(batch["idx"], batch["attention_mask"])  # (2B,), one forward pass over the padded batch
    loss1, _ = bradley_terry_loss(one_pass[:24], one_pass[24:], batch["margin"])
    assert loss.item() == pytest.approx(loss1.item(), abs=1e-6)
    for g, g1 in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss1, params)):
        assert torch.allclose(g, g1, atol=1e-6, rtol=1e-4)


def test_swapping_chosen_and_rejected_gives_one_minus_p(tok):
    rm = tiny_rm(tok, seed=3)
    prompt = "### Instruction:\nReverse the list.\n### Input:\ncat, sun\n### Response:\n"
    batch = collate_pairs(encode_pairs(tok, [{"prompt": prompt, "chosen": "sun, cat", "rejected": "cat, sun"}], 64),
                          tok.pad_token_id)
    with torch.no_grad():
        r = rm(batch["idx"], batch["attention_mask"])
    p = math.exp(-bradley_terry_loss(r[:1], r[1:])[0].item())
    p_swapped = math.exp(-bradley_terry_loss(r[1:], r[:1])[0].item())
    assert p_swapped == pytest.approx(1 - p, abs=1e-6)
    assert p == pytest.approx(1 / (1 + math.exp(-(r[0] - r[1]).item())), abs=1e-6)


def test_head_init_statistics():
    torch.manual_seed(0)
    head = value_head(40_000)
    w = head.weight.flatten().tolist()
    assert statistics.pstdev(w) == pytest.approx(1 / math.sqrt(40_001), rel=0.03)
    assert abs(statistics.fmean(w)) < 5 / math.sqrt(40_001) / math.sqrt(40_000)  # 5 standard errors
    assert head.bias.item() == 0.0 and head.weight.shape == (1, 40_000)


def test_head_init_std_is_one_over_sqrt_c_plus_1_for_a_small_c():
    """At C = 3 the +1 matters: std 1/2, not 1/sqrt(3) (6,000 weights: a standard error of about 1%)."""
    torch.manual_seed(0)
    w = torch.cat([value_head(3).weight.flatten() for _ in range(2000)]).tolist()
    assert statistics.pstdev(w) == pytest.approx(1 / math.sqrt(3 + 1), rel=0.05)


def test_dropout_is_disabled_and_buffers_start_at_identity(tok):
    torch.manual_seed(0)
    rm = RewardModel(GPT(preset("tiny", vocab_size=tok.vocab_size, dropout=0.3)))
    assert all(m.p == 0 for m in rm.modules() if isinstance(m, torch.nn.Dropout))
    assert rm.backbone.config.dropout == 0.0 and rm.gain.item() == 1.0 and rm.bias.item() == 0.0
    rm.train()
    x = torch.randint(tok.vocab_size - 2, (2, 10))
    assert torch.equal(rm(x), rm(x))  # deterministic in training mode


# -- data -----------------------------------------------------------------------------------------------------


def test_prompt_is_cut_from_the_left_and_the_response_never(tok):
    prompt = "### Instruction:\nSort the words alphabetically.\n### Input:\ncat, sun, tree, moon\n### Response:\n"
    response = "cat, moon, sun, tree"
    p, a = tok.encode(prompt), tok.encode(response) + [tok.eos_token_id]
    assert encode_response(tok, prompt, response, 200) == p + a  # fits: nothing cut
    assert encode_response(tok, prompt, response, 40) == p[len(p) - (40 - len(a)):] + a  # the prompt's last tokens
    assert encode_response(tok, prompt, response, len(a)) == a
    bad = [{"prompt": prompt, "chosen": "cat", "rejected": "dog"}] * 3 + [{"prompt": prompt, "chosen": "cat",
                                                                          "rejected": response}]
    with pytest.raises(ValueError, match=f"example 3: the response and eos are {len(a)} tokens, more than the reward "
                                         f"model's context of 20 tokens"):
        encode_pairs(tok, bad, 20)


def test_batches_hold_chosen_then_rejected_with_margins(tok):
    enc = [([1, 2, 3], [4, 5], 0.5), ([6], [7, 8, 9, 10], 0.0)]
    batch = collate_pairs(enc, pad_token_id=99)
    assert batch["idx"].tolist() == [[1, 2, 3, 99], [6, 99, 99, 99], [4, 5, 99, 99], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["margin"].tolist() == [0.5, 0.0]


def test_jsonl_errors_name_the_line_and_bad_margins_the_pair(tmp_path, tok):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(ValueError, match="line 2: missing field 'rejected'"):
        read_pairs(path)
    with pytest.raises(ValueError, match="pair 1: margin must be a finite number, got 'big'"):
        encode_pairs(tok, [{"prompt": "a", "chosen": "b", "rejected": "c"},
                           {"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}], 32)


def test_pair_metrics_by_hand():
    rc, rr = torch.tensor([1.0, 0.0, 3.0, -1.0]), torch.tensor([0.0, 1.0, 2.0, -2.0])
    m = pair_metrics(rc, rr, kinds=["a", "b", "a", "b"])
    assert m["accuracy"] == 0.75 and m["mean_margin"] == pytest.approx((1 - 1 + 1 + 1) / 4)
    assert m["val_loss"] == pytest.approx((3 * hand_nll(1.0) + hand_nll(-1.0)) / 4, rel=1e-6)
    assert m["accuracy_by_kind"] == {"a": 1.0, "b": 0.5}


def test_pair_metrics_use_the_margins_in_the_loss_only_and_count_a_tie_as_no_win():
    """val_loss subtracts each pair's margin; mean_margin is the plain mean of r_c - r_r; a tie wins no kind."""
    rc, rr, margin = [2.0, 0.5, 1.0, -1.0], [1.0, 0.5, 3.0, -1.5], [0.5, 0.0, 1.0, 2.0]
    m = pair_metrics(torch.tensor(rc), torch.tensor(rr), torch.tensor(margin), kinds=["a", "a", "b", "b"])
    assert m["val_loss"] == pytest.approx(sum(hand_nll(c - r - g) for c, r, g in zip(rc, rr, margin)) / 4, rel=1e-6)
    assert m["mean_margin"] == pytest.approx(sum(c - r for c, r in zip(rc, rr)) / 4)
    assert m["accuracy"] == 0.5 and m["accuracy_by_kind"] == {"a": 0.5, "b": 0.5}  # pair 1 is a tie


# -- normalisation ---------------------------------------------------------------------------------------------


def test_normalize_gives_mean_0_and_std_1_on_the_reference_set(tok):
    rm = tiny_rm(tok, seed=1)
    torch.manual_seed(2)
    sft = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=64))
    prompts = [ex["prompt"] for ex in tasks.ppo_prompts(seed=0, n_train=0, n_test=12)[1]]
    responses = engine.complete_all(sft, [tok.encode(p) for p in prompts], 6, tok.eos_token_id, tok.pad_token_id,
                                    temperature=1.0, seed=0, truncate_prompts=True)
    assert len(responses) == 12 and all(len(r) <= 6 and tok.eos_token_id not in r for r in responses)
    stats = normalize(rm, reference_batches(tok, prompts, responses, rm.block_size, batch_size=5))
    assert stats["n"] == 12
    with torch.no_grad():  # each reference sequence scored alone, unpadded
        r = [rm(torch.tensor([tok.encode(p)[-(63 - len(a)):] + a + [tok.eos_token_id]])).item()
             for p, a in zip(prompts, responses)]
    assert statistics.fmean(r) == pytest.approx(0.0, abs=1e-5)
    assert statistics.pstdev(r) == pytest.approx(1.0, rel=1e-4)
    assert rm.gain.item() == pytest.approx(1 / stats["std"]) and rm.bias.item() == pytest.approx(
        -stats["mean"] / stats["std"])


def test_normalize_refuses_constant_rewards(tok):
    rm = tiny_rm(tok)
    torch.nn.init.zeros_(rm.head.weight)
    batches = reference_batches(tok, ["a", "b"], [tok.encode("c"), tok.encode("d")], rm.block_size)
    with pytest.raises(ValueError, match="cannot scale them to std 1"):
        normalize(rm, batches)


def test_normalizing_a_model_already_scaled_reads_the_head_not_its_rewards(tok):
    """gain and bias come from w . h + b whatever they were before: the rewards end at mean 0 and std 1 again."""
    rm = tiny_rm(tok, seed=1)
    rm.gain.fill_(3.0)
    rm.bias.fill_(2.0)
    prompts = ["What is 2 + 3?", "Sort the words: sun, cat", "Reverse the list: a, b, c", "What is 9 + 1?"]
    responses = [tok.encode(r) for r in ("5", "cat, sun", "c, b, a", "10 and more")]
    normalize(rm, reference_batches(tok, prompts, responses, rm.block_size, batch_size=3))
    with torch.no_grad():  # each sequence scored alone, unpadded
        r = [rm(torch.tensor([tok.encode(p) + a + [tok.eos_token_id]])).item() for p, a in zip(prompts, responses)]
    assert statistics.fmean(r) == pytest.approx(0.0, abs=1e-5)
    assert statistics.pstdev(r) == pytest.approx(1.0, rel=1e-4)


# -- saving, loading, PEFT ---------------------------------------------------------------------------------------


def test_save_and_load_round_trip_keeps_rewards_and_normalisation(tmp_path, tok):
    rm = tiny_rm(tok, seed=4)
    rm.gain.fill_(2.5)
    rm.bias.fill_(-0.75)
    x = torch.randint(tok.vocab_size - 2, (3, 12))
    save_reward_model(rm, tok, tmp_path / "reward")
    loaded, tok2 = load_reward_model(tmp_path / "reward")
    assert tok2.to_dict() == tok.to_dict() and loaded.gain.item() == 2.5 and loaded.bias.item() == -0.75
    with torch.no_grad():
        assert torch.allclose(loaded(x), rm(x), atol=1e-6)
    save_checkpoint(tmp_path / "lm.pt", {"model": {}, "stage": "sft", "model_config": {}, "tokenizer": {}})
    with pytest.raises(ValueError, match="is a language model \\(stage 'sft'\\); expected a reward model"):
        load_reward_model(tmp_path / "lm.pt")


def test_a_loaded_reward_model_is_frozen_and_a_missing_head_tensor_is_refused(tmp_path, tok):
    """load_reward_model gives a frozen model in eval mode; a folder lacking one of the head's tensors is refused."""
    from safetensors.torch import load_file, save_file

    save_reward_model(tiny_rm(tok), tok, tmp_path / "reward")
    loaded, _ = load_reward_model(tmp_path / "reward")
    assert not any(m.training for m in loaded.modules()) and not any(p.requires_grad for p in loaded.parameters())
    weights = tmp_path / "reward" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if k != "gain"}, str(weights))
    with pytest.raises(ValueError, match=r"the reward head does not fit \(missing \['gain'\]"):
        load_reward_model(tmp_path / "reward")


def test_lora_backbone_trains_only_lora_and_head_and_saves_merged(tmp_path, tok):
    torch.manual_seed(0)
    sft = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=64))
    rm = make_reward_model(sft, peft.LoraConfig(r=2, alpha=4))
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained-looking update
    x = torch.randint(tok.vocab_size - 2, (2, 16))
    save_reward_model(rm, tok, tmp_path / "reward")
    loaded, _ = load_reward_model(tmp_path / "reward")
    assert getattr(loaded.backbone, "peft_config", None) is None  # a plain GPT
    assert getattr(rm.backbone, "peft_config", None) is not None  # the trained model is left as it was
    with torch.no_grad():
        assert torch.allclose(loaded(x), rm(x), atol=1e-5)


@pytest.mark.parametrize("config, block", [(peft.PromptTuningConfig(num_virtual_tokens=4), 28),
                                           (peft.PrefixTuningConfig(num_virtual_tokens=3), 32)],
                         ids=["prompt", "prefix"])
def test_prompt_methods_read_the_right_hidden_states_and_round_trip(tmp_path, tok, config, block):
    torch.manual_seed(0)
    rm = make_reward_model(GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=32)), config)
    assert rm.block_size == block  # virtual tokens in the input take context; prefix keys do not
    pad = tok.pad_token_id
    idx = torch.tensor([[pad, pad, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    h = ln_f_output(rm.backbone, idx, mask)[:, -1]  # (B, C) from GPT.forward of the patched backbone
    with torch.no_grad():
        assert torch.allclose(rm(idx, mask), rm.head(h).squeeze(-1), atol=1e-5)
        save_reward_model(rm, tok, tmp_path / "reward")
        loaded, _ = load_reward_model(tmp_path / "reward")
        assert torch.allclose(loaded(idx, mask), rm(idx, mask), atol=1e-6)


# -- training ---------------------------------------------------------------------------------------------------


def test_short_run_on_built_in_pairs_beats_chance(tmp_path, tok, pairs):
    # from scratch, on the pairs whose responses are short (a short context keeps the run fast; prompts are cut)
    train_pairs, test_pairs = ([p for p in ps if max(len(p["chosen"]), len(p["rejected"])) < 60] for ps in pairs)
    rm = tiny_rm(tok, seed=0, block_size=96)
    test_set = encode_pairs(tok, test_pairs, rm.block_size)
    before = pair_metrics(*score_pairs(rm, test_set, tok.pad_token_id))
    cfg = TrainConfig(max_iters=120, batch_size=16, lr=1e-2, min_lr=1e-3, warmup_iters=10, weight_decay=0.0,
                      eval_interval=120, eval_iters=1, out_dir=str(tmp_path), device="cpu", progress=False, plot=False)
    rows = train_reward_model(rm, tok, train_pairs, test_pairs, cfg)
    assert set(rows[-1]) >= {"val_loss", "accuracy", "mean_margin"}
    kinds = ["extra text" if p["kind"] in ("rambling", "junk") else p["kind"] for p in test_pairs]
    after = pair_metrics(*score_pairs(rm, test_set, tok.pad_token_id), kinds=kinds)
    assert after["accuracy"] == pytest.approx(rows[-1]["accuracy"])  # the loop evaluated the same pairs
    assert abs(before["accuracy"] - 0.5) < 0.1 and after["accuracy"] >= 0.6 and after["mean_margin"] > 0
    assert after["accuracy_by_kind"]["extra text"] >= 0.85  # the answer followed by more text is worse
    assert after["val_loss"] < before["val_loss"] - 0.05


def test_training_loss_is_bradley_terry_with_margin_and_centring_on_the_templated_pairs(tmp_path, tok):
    """The loop's first training loss is -log sigmoid(r_c - r_r - m) + c (r_c + r_r)^2 of the prompt in the template."""
    rm = tiny_rm(tok, seed=5)
    pair = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "5 and more", "margin": 0.5}
    prompt = tok.encode("### Instruction:\nWhat is 2 + 3?\n### Response:\n")
    with torch.no_grad():  # before the first step, each response scored alone
        r_c, r_r = (rm(torch.tensor([prompt + tok.encode(a) + [tok.eos_token_id]])).item() for a in ("5", "5 and more"))
    cfg = TrainConfig(max_iters=1, batch_size=2, lr=1e-3, min_lr=1e-4, warmup_iters=0, weight_decay=0.0,
                      eval_interval=1, eval_iters=1, out_dir=str(tmp_path), device="cpu", progress=False, plot=False)
    rows = train_reward_model(rm, tok, [pair] * 3, [pair], cfg, center_coef=0.3, template=tasks.TEMPLATE)
    assert rows[0]["train_loss"] == pytest.approx(hand_nll(r_c - r_r - 0.5) + 0.3 * (r_c + r_r) ** 2, rel=1e-5)


def test_cli_writes_every_output(tmp_path, tok, pairs, monkeypatch):
    torch.manual_seed(0)
    sft = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=256))
    save_folder(tmp_path / "sft", sft, tok, "sft", template=True)
    for name, rows in (("train", pairs[0][:40]), ("test", pairs[1][:10])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "reward"
    results = main(["--sft", str(tmp_path / "sft"), "--out-dir", str(out), "--train-file",
                    str(tmp_path / "train.jsonl"), "--test-file", str(tmp_path / "test.jsonl"), "--max-iters", "3",
                    "--batch-size", "4", "--n-normalize", "6", "--max-new-tokens", "4", "--device", "cpu",
                    "--no-progress", "--peft"])
    for f in ("model.json", "model.safetensors", "metrics.jsonl", "loss.png", "reward_hist.png", "results.json"):
        assert (out / f).is_file(), f
    assert results["method"] == "lora" and results["normalization"]["n"] == 6
    assert set(results["accuracy_by_kind"]) <= {"ill_formed", "wrong_vs_ill_formed", "rambling", "junk"}
    loaded, _ = load_reward_model(out)
    assert loaded.gain.item() == pytest.approx(1 / results["normalization"]["std"])
    with pytest.raises(ValueError, match=r"only the lora tensors of a reward model .* open the finished run's folder"):
        checkpoint.load(out / "ckpt.pt")  # the run's checkpoint holds LoRA and the head, with no base to put them on
    # without --peft the size of the backbone decides: all weights for a small one, LoRA above LORA_ABOVE
    args = ["--sft", str(tmp_path / "sft"), "--train-file", str(tmp_path / "train.jsonl"), "--test-file",
            str(tmp_path / "test.jsonl"), "--max-iters", "1", "--batch-size", "2", "--n-normalize", "0",
            "--device", "cpu", "--no-progress"]
    assert main(args + ["--out-dir", str(tmp_path / "auto")])["method"] == "full"
    monkeypatch.setattr(rlhf.reward_model, "LORA_ABOVE", sft.num_parameters() - 1)
    assert main(args + ["--out-dir", str(tmp_path / "auto_big")])["method"] == "lora"
    assert main(args + ["--out-dir", str(tmp_path / "forced"), "--peft", "full"])["method"] == "full"
    with pytest.raises(SystemExit):
        main(["--help"])
