"""SFT: the answer-only loss mask, padding, batched greedy answers, and a short run of every method."""

import dataclasses

import numpy as np
import pytest
import torch

import peft
from minigpt import GPT, checkpoint, preset, sft, tasks
from minigpt.corpus import build_corpus
from minigpt.data import length_groups
from minigpt.sft import finetune, method_config
from minigpt.train import TrainConfig


@pytest.fixture(scope="module")
def tok(bpe_tok):
    return bpe_tok


@pytest.fixture(scope="module")
def data():
    return tasks.sft_examples(seed=0, n_train=400, n_test=40)


def test_labels_mask_the_prompt_and_keep_answer_and_eos(tok):
    ex = {"instruction": "Calculate the result.", "input": "2 + 3", "output": "5"}
    tokens, labels = sft.encode_example(tok, ex)
    prompt = tok.encode("### Instruction:\nCalculate the result.\n### Input:\n2 + 3\n### Response:\n")
    answer = tok.encode("5")
    assert tokens == prompt + answer + [tok.eos_token_id]
    assert labels == [-100] * len(prompt) + answer + [tok.eos_token_id]


def test_loss_counts_only_answer_tokens(tok, data):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=128)).eval()
    encoded = sft.encode_dataset(tok, data[0][:3], 128)
    x, y = sft.collate(encoded, tok.pad_token_id)
    assert x.shape == y.shape and (x[y == -100].numel() > 0)
    with torch.no_grad():
        _, loss = model(x, y)
        # by hand: run each example alone, unpadded, and average -log p over its answer tokens and eos
        nll = []
        for tokens, labels in encoded:
            logits, _ = model(torch.tensor([tokens[:-1]]))
            logp = torch.log_softmax(logits[0], -1)
            for t in range(len(tokens) - 1):
                if labels[t + 1] != -100:
                    nll.append(-logp[t, tokens[t + 1]])
    assert torch.allclose(loss, torch.stack(nll).mean(), atol=1e-5)
    # padding: inputs padded with the pad token on the right, labels -100 there
    n0 = len(encoded[0][0]) - 1
    assert (x[0, n0:] == tok.pad_token_id).all() and (y[0, n0:] == -100).all()


def test_length_groups_partition_the_rows_shortest_first():
    lengths = torch.tensor([9, 3, 7, 3, 12, 1, 5, 8, 2, 6])
    groups = length_groups(lengths, rows_per_pass=3)
    assert len(groups) == 3  # round(10 / 3)
    assert sorted(torch.cat(groups).tolist()) == list(range(10))  # every row exactly once
    in_order = torch.cat([lengths[g] for g in groups]).tolist()
    assert in_order == sorted(lengths.tolist())
    assert len(length_groups(lengths, rows_per_pass=20)) == 1


def test_length_groups_are_the_rows_over_rows_per_pass_rounded():
    """length_groups: round(B / rows_per_pass) groups, so 15 rows of about 4 make 4 groups, not 3."""
    assert [len(g) for g in length_groups(torch.arange(15), rows_per_pass=4)] == [4, 4, 4, 3]
    assert len(length_groups(torch.arange(12), rows_per_pass=8)) == 2  # round(1.5)


@pytest.mark.parametrize("method", ["full", "prompt_tuning"])
def test_a_batch_in_passes_by_length_has_the_loss_and_gradient_of_one_pass(tok, data, method):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=128))
    if method == "prompt_tuning":
        peft.get_peft_model(model, peft.PromptTuningConfig(num_virtual_tokens=3))
    encoded = sft.encode_dataset(tok, data[0][:40], 120)
    x, y = sft.collate(encoded, tok.pad_token_id)
    lengths = torch.tensor([len(tokens) - 1 for tokens, _ in encoded])
    assert len(length_groups(lengths)) >= 2 and lengths.min() < x.size(1) - 10  # several passes, some far shorter
    summed, n = sft.summed_loss(model, x, y)
    grads = torch.autograd.grad(summed / n, [p for p in model.parameters() if p.requires_grad])
    # independently: each example alone, unpadded, -log p summed over its labelled positions
    with torch.no_grad():
        nll, count = 0.0, 0
        for tokens, labels in encoded:
            logp = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0][0], -1)
            for t in range(len(tokens) - 1):
                if labels[t + 1] != -100:
                    nll, count = nll - logp[t, tokens[t + 1]].item(), count + 1
    assert int(n) == count and summed.item() == pytest.approx(nll, rel=1e-5)
    _, one_pass = model(x, y)  # the padded batch in one pass
    for g, g1 in zip(grads, torch.autograd.grad(one_pass, [p for p in model.parameters() if p.requires_grad])):
        assert torch.allclose(g, g1, atol=1e-6, rtol=1e-4)


def test_too_long_example_is_refused_with_its_index(tok):
    ex = {"instruction": "Sort the words.", "input": ", ".join(["apple"] * 60), "output": "apple"}
    with pytest.raises(ValueError, match="example 0 is .* tokens long but the model's context is 64"):
        sft.encode_dataset(tok, [ex], 64)


def test_batched_answers_equal_one_by_one(tok, data):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=128)).eval()
    examples = data[1][:5]
    together = sft.generate_answers(model, tok, examples, max_new_tokens=8, batch_size=5)
    alone = [sft.generate_answers(model, tok, [ex], max_new_tokens=8)[0] for ex in examples]
    assert together == alone


def test_evaluate_counts_exact_matches_overall_and_per_task(tok, data, monkeypatch):
    examples = data[1][:6]
    # answers chosen by hand: right for examples 0, 2 and 3, wrong (more text, other words, empty) for the rest
    answers = [examples[0]["output"], examples[1]["output"] + " and more", examples[2]["output"].upper() + ".",
               examples[3]["output"], "not an answer", ""]
    monkeypatch.setattr(sft, "generate_answers", lambda *args, **kwargs: answers)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=128))
    scores = sft.evaluate(model, tok, examples)
    assert scores["accuracy"] == 3 / 6
    expected = {}
    for i, ex in enumerate(examples):
        expected.setdefault(ex["task"], []).append(i in (0, 2, 3))
    assert scores["accuracy_by_task"] == {t: sum(v) / len(v) for t, v in expected.items()}


@pytest.fixture(scope="module")
def base_state(tok):
    """A tiny GPT pretrained briefly on the built-in corpus, so every method starts from a language model."""
    from minigpt.data import random_batch

    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=128))
    ids = np.array(tok.encode(build_corpus(seed=0, n_chars=60_000)), dtype=np.uint16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        _, loss = model(*random_batch(ids, 16, 64, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("method", ["full", *peft.CONFIGS])
def test_a_short_run_of_each_method_lowers_the_held_out_answer_loss(tok, data, base_state, tmp_path, method):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=128))
    model.load_state_dict(base_state)
    small = {"num_virtual_tokens": 4, "r": 4, "reduction_factor": 4}  # the options of this method, of these three
    names = [] if method == "full" else [f.name for f in dataclasses.fields(peft.CONFIGS[method])]
    config = method_config(method, **{k: v for k, v in small.items() if k in names})
    before = sft.answer_loss(model, sft.encode_dataset(tok, data[1], 120), tok.pad_token_id)
    prompt_side = method in ("prompt_tuning", "p_tuning", "p_tuning_v2")  # prefix-tuning's MLP wants the usual lr
    lr = 3e-3 if method == "full" else 0.3 if prompt_side else 3e-2  # virtual tokens need large steps
    cfg = TrainConfig(max_iters=30, batch_size=16, lr=lr, min_lr=lr / 10, warmup_iters=2, eval_interval=100,
                      eval_iters=1, out_dir=str(tmp_path), progress=False, plot=False)
    result = finetune(model, tok, data[0], data[1], config, cfg, eval_examples=40)
    # a 2-layer, 32-dim model moves slowly through a 4-token prompt (Lester et al.: prompt tuning needs scale)
    assert result["answer_loss"] < before - (0.05 if prompt_side else 0.2), (method, before, result["answer_loss"])
    checkpoint.save_model(tmp_path / "base", GPT(model.config), tok, "pretrain")
    saved = checkpoint.save_model(tmp_path / "ft", model, tok, "sft", base=tmp_path / "base")
    written = "model.safetensors" if method == "full" else "adapter.safetensors"
    assert (saved / written).is_file() and {p.name for p in saved.iterdir()} == {written, "model.json",
                                                                                 "tokenizer.json"}


def test_save_and_load_finetuned_peft_model(tok, data, tmp_path):
    torch.manual_seed(0)
    base = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=128))
    checkpoint.save_model(tmp_path / "base", base, tok, "pretrain")
    peft.get_peft_model(base, peft.LoraConfig(r=2))
    with torch.no_grad():
        for n, p in base.named_parameters():
            if p.requires_grad:
                p.normal_()
    checkpoint.save_model(tmp_path / "ft", base, tok, "sft", template=tasks.TEMPLATE, base=tmp_path / "base")
    loaded = checkpoint.load(tmp_path / "ft")
    x = torch.randint(0, tok.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x)[0], base.eval()(x)[0])
    assert loaded.tokenizer.ranks == tok.ranks and loaded.info["template"] == tasks.TEMPLATE
    assert loaded.model.peft_config == base.peft_config


def test_method_config_refuses_options_of_another_method():
    assert method_config("lora", r=4, alpha=8.0) == peft.LoraConfig(r=4, alpha=8.0)
    assert method_config("lora", r=None) == peft.LoraConfig()  # None: the method's default
    with pytest.raises(ValueError, match=r"lora has no option 'num_virtual_tokens'; its options are \['r', 'alpha'"):
        method_config("lora", num_virtual_tokens=4)
    with pytest.raises(ValueError, match="method 'full' trains all weights"):
        method_config("full", r=4)
    with pytest.raises(ValueError, match="unknown method 'loraa'"):
        method_config("loraa")
