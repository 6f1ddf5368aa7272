"""SFT: the answer-only loss mask, padding, batched greedy answers, and a short run of every method."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import tiny_gpt

import peft
from minigpt import GPT, checkpoint, engine, preset, sft, tasks
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
    assert x.shape == y.shape == (3, max(len(tokens) for tokens, _ in encoded) - 1)  # the longest row, less one
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


def hand_tokens(tok, ex):
    """An example's tokens by hand: the prompt written out in the template, then the answer and eos."""
    head = f"### Instruction:\n{ex['instruction']}\n" + (f"### Input:\n{ex['input']}\n" if ex["input"] else "")
    prompt = tok.encode(head + "### Response:\n")
    return prompt, prompt + tok.encode(ex["output"]) + [tok.eos_token_id]


def hand_answer_nll(model, tok, tokens_list):
    """(summed -log p of the answer tokens and eos, their number), each example run alone and unpadded."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt, tokens in tokens_list:
            logp = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0][0], -1)
            for t in range(len(prompt) - 1, len(tokens) - 1):  # position t predicts token t + 1, an answer token
                nll, count = nll - logp[t, tokens[t + 1]].item(), count + 1
    return nll, count


def test_answer_loss_is_the_mean_over_all_answer_tokens(tok, data):
    """answer_loss: -log p summed over every answer token (and eos) of all examples, over their number, whatever the
    batches (5 examples in batches of 2: the last one alone)."""
    model = tiny_gpt(tok.vocab_size, block_size=128).eval()
    examples = data[1][:5]
    nll, count = hand_answer_nll(model, tok, [hand_tokens(tok, ex) for ex in examples])
    encoded = sft.encode_dataset(tok, examples, 128)
    assert sft.answer_loss(model, encoded, tok.pad_token_id, batch_size=2) == pytest.approx(nll / count, rel=1e-5)


def test_an_example_that_just_fits_the_context_is_kept(tok):
    """A context of block_size holds an example of block_size + 1 tokens (inputs and targets shifted by one)."""
    ex = {"instruction": "Sort the words.", "input": "cat, sun, tree", "output": "cat, sun, tree"}
    n = len(hand_tokens(tok, ex)[1])
    assert sft.encode_dataset(tok, [ex], n - 1)[0][0] == hand_tokens(tok, ex)[1]
    with pytest.raises(ValueError, match=f"example 0 is {n} tokens long but the model's context is {n - 2}"):
        sft.encode_dataset(tok, [ex], n - 2)


def test_generate_answers_asks_the_engine_with_the_formatted_prompts(tok, data, monkeypatch):
    """The engine gets each example's prompt (with its input), at most max_new_tokens and no more than the context
    leaves beside the longest prompt; the responses come back decoded."""
    calls = []

    def complete_all(model, prompts, max_new_tokens, eos_token_id, pad_token_id, batch_size, **kwargs):
        calls.append((prompts, max_new_tokens, eos_token_id))
        return [tok.encode(f"answer {i}") for i in range(len(prompts))]

    monkeypatch.setattr(engine, "complete_all", complete_all)
    examples = [ex for ex in data[1] if ex["input"]][:2] + [ex for ex in data[1] if not ex["input"]][:1]
    prompts = [hand_tokens(tok, ex)[0] for ex in examples]
    for block_size, asked in ((128, 8), (max(map(len, prompts)) + 5, 32)):
        model = tiny_gpt(tok.vocab_size, block_size=block_size)
        assert sft.generate_answers(model, tok, examples, max_new_tokens=asked) == ["answer 0", "answer 1", "answer 2"]
        assert calls[-1] == (prompts, min(asked, block_size - max(map(len, prompts))), tok.eos_token_id)
    assert calls[-1][1] == 5


def test_random_batch_draws_every_example(tok, data):
    """Rows are drawn from all the examples, the last one included (told apart here by their lengths)."""
    encoded = sft.encode_dataset(tok, data[0][:40], 128)
    lengths = {len(tokens) - 1 for tokens, _ in encoded}
    encoded = [next(e for e in encoded if len(e[0]) - 1 == n) for n in sorted(lengths)[:3]]  # 3 different lengths
    x, y = sft.random_batch(encoded, 60, tok.pad_token_id, torch.Generator().manual_seed(0))
    assert x.shape[0] == 60 and {int(n) for n in (x != tok.pad_token_id).sum(1)} == set(sorted(lengths)[:3])


def test_finetune_trains_on_the_training_set_with_the_mean_answer_loss(tok, data, tmp_path, monkeypatch):
    """What finetune hands the training loop: batches of cfg.batch_size training examples (never held-out ones), a
    loss that is the mean -log p over the batch's answer tokens, and an evaluation on the first eval_examples."""
    seen = {}

    def train(model, get_batch, loss_fn, cfg, eval_fn, meta=None, resume=None):
        seen.update(get_batch=get_batch, loss_fn=loss_fn, eval_fn=eval_fn)
        return [{"iter": 0, "val_loss": 1.0, "accuracy": 0.5, "elapsed_s": 0.0}]

    monkeypatch.setattr(sft, "train", train)
    train_examples, test_examples = data[0][:6], data[1][:5]
    model = tiny_gpt(tok.vocab_size, block_size=128)
    cfg = TrainConfig(batch_size=8, out_dir=str(tmp_path), progress=False, plot=False)
    finetune(model, tok, train_examples, test_examples, None, cfg, eval_examples=3)
    x, y = seen["get_batch"](torch.Generator().manual_seed(0))
    assert x.shape[0] == 8
    train_inputs = [hand_tokens(tok, ex)[1][:-1] for ex in train_examples]
    test_inputs = [hand_tokens(tok, ex)[1][:-1] for ex in test_examples]
    rows = [[int(i) for i in row if i != tok.pad_token_id] for row in x]
    assert all(r in train_inputs and r not in test_inputs for r in rows)
    drawn = [hand_tokens(tok, train_examples[train_inputs.index(r)]) for r in rows]
    nll, count = hand_answer_nll(model.eval(), tok, drawn)
    with torch.no_grad():
        assert seen["loss_fn"](model, (x, y)).item() == pytest.approx(nll / count, rel=1e-5)
    evaluated = []
    monkeypatch.setattr(sft, "evaluate", lambda m, t, examples, *a, **k: evaluated.append(examples) or
                        {"answer_loss": 0.0, "accuracy": 0.0})
    seen["eval_fn"](model)
    assert evaluated == [test_examples[:3]]
