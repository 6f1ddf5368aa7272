"""The generation engine: batched completions against one-by-one decoding with full forward passes, the response
mask, log-probabilities under the sampling distribution, streaming, the context edge, and settings refused by name."""

import math

import pytest
import torch
from conftest import tiny_gpt

import peft
from minigpt import engine

EOS, PAD = 30, 31


def greedy_by_hand(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with a full forward pass over the whole sequence at every step (no cache, no padding)."""
    seq = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq]))[0][0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if nxt == EOS:
                break
    return out


def test_a_batch_of_prompts_completes_as_each_prompt_alone():
    model = tiny_gpt(32).eval()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 9, 2]]
    out = engine.complete(model, prompts, 6, EOS, PAD)
    assert out.prompt_len == 5 and out.tokens.shape == (3, 5 + out.response_mask.size(1))
    for b, p in enumerate(prompts):
        assert out.responses()[b] == [t for t in greedy_by_hand(model, p, 6) if t != EOS]
        assert out.attention_mask[b, :5].tolist() == [0] * (5 - len(p)) + [1] * len(p)  # left padding


def test_the_response_mask_stops_after_the_first_eos_and_responses_cut_before_it():
    response = torch.tensor([[4, EOS, 6, EOS], [4, 5, 6, 7], [EOS, PAD, PAD, PAD]])
    assert engine.response_mask_of(response, EOS).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    gen = engine.Generation(torch.cat([torch.ones(3, 2, dtype=torch.long), response], 1), torch.ones(3, 6), 2,
                            engine.response_mask_of(response, EOS), EOS)
    assert gen.responses() == [[4], [4, 5, 6, 7], []]
    assert gen.has_eos.tolist() == [True, False, True]


@pytest.mark.parametrize("temperature, top_k", [(0.7, None), (1.3, 5), (0.0, None)])
def test_logprobs_are_those_of_the_sampling_distribution(temperature, top_k):
    model = tiny_gpt(32).eval()
    prompts = [[1, 2, 3], [4, 5]]
    out = engine.complete(model, prompts, 5, EOS, PAD, temperature=temperature, top_k=top_k, seed=0, logprobs=True)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            resp = out.responses()[b] + ([EOS] if out.has_eos[b] else [])
            seq = torch.tensor([p + resp])
            logits = model(seq)[0][0, len(p) - 1 : -1]  # (R, V): the position before each response token
            scaled = logits / (temperature or 1.0)
            if top_k:
                kth = scaled.topk(top_k, -1).values[:, -1:]
                scaled = scaled.masked_fill(scaled < kth, -math.inf)
            expected = torch.log_softmax(scaled, -1).gather(-1, torch.tensor(resp)[:, None]).squeeze(-1)
            torch.testing.assert_close(out.logprobs[b, : len(resp)], expected, atol=1e-5, rtol=0)
            assert (out.logprobs[b, len(resp):] == 0).all()


def test_stream_yields_the_tokens_generate_returns():
    model = tiny_gpt(32)
    idx = torch.tensor([[1, 2, 3]])
    seeded = lambda: torch.Generator().manual_seed(3)
    streamed = [int(t) for t in engine.stream(model, idx, 8, temperature=0.9, generator=seeded())]
    whole = engine.generate(model, idx, 8, temperature=0.9, generator=torch.Generator().manual_seed(3))
    assert whole[0, 3:].tolist() == streamed and model.training  # the mode is given back


def test_sampling_settings_are_refused_by_name():
    model = tiny_gpt(32)
    idx = torch.tensor([[1]])
    for kwargs, match in [({"temperature": float("nan")}, "temperature must be a finite number"),
                          ({"temperature": -1.0}, "temperature must be"), ({"top_k": 0}, "top_k must be"),
                          ({"top_p": 1.5}, "top_p must be in"), ({"top_p": True}, "top_p must be in"),
                          ({"top_p": 0.0}, "top_p must be in"), ({"top_p": float("nan")}, "top_p must be in"),
                          ({"top_k": True}, "top_k must be"), ({"temperature": True}, "temperature must be")]:
        with pytest.raises(ValueError, match=match):
            engine.generate(model, idx, 2, **kwargs)
    too_long = "a prompt of 60 tokens plus max_new_tokens=10 exceeds the model's context of 64"
    with pytest.raises(ValueError, match=too_long):
        engine.complete(model, [[1] * 60], 10, EOS, PAD)
    out = engine.complete(model, [[1] * 60], 10, EOS, PAD, truncate_prompts=True)
    assert out.prompt_len == 54


def test_a_prompt_method_at_the_context_edge_generates_with_the_cache():
    """Block 32, 4 virtual tokens: a 28-token input fits exactly; 30 tokens keep the last 28 (the window)."""
    model = peft.get_peft_model(tiny_gpt(32, block_size=32), peft.PromptTuningConfig(num_virtual_tokens=4))
    for n in (28, 30, 33):
        idx = torch.arange(n)[None] % 29
        cached = engine.generate(model, idx, 3, temperature=0)
        uncached = engine.generate(model, idx, 3, temperature=0, use_cache=False)
        assert torch.equal(cached, uncached), n


@pytest.mark.parametrize("n_virtual", [0, 4])
def test_a_padded_batch_decoded_step_by_step_gives_each_row_alone(n_virtual):
    # a KVCache with no capacity grows its keys, values and key mask by doubling; the prompt step carries the
    # padding, the one-token steps after it pass no mask (the cache remembers which positions were padding);
    # n_virtual: prompt tuning's virtual tokens come first in the cache, real keys that are not tokens seen
    model = tiny_gpt(32).eval()
    if n_virtual:
        model = peft.get_peft_model(model, peft.PromptTuningConfig(num_virtual_tokens=n_virtual)).eval()
    rows = [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5]]
    ids, mask = engine.left_pad(rows, PAD)
    extra = torch.tensor([[7, 8, 9, 10, 11, 12, 13]] * 3)  # the same seven tokens after every prompt
    cache = engine.KVCache(model.config.n_layer)
    with torch.no_grad():
        steps = [engine.next_token_logits(model, ids, mask, cache)]
        steps += [engine.next_token_logits(model, extra[:, t : t + 1], None, cache) for t in range(7)]  # regrows
        assert len(cache) == n_virtual + 6 + 7
        assert cache.key_mask.tolist()[1] == [True] * n_virtual + [False] * 4 + [True] * 9
        assert cache.n_seen.tolist() == [13, 9, 10]  # real tokens per row: the next position ids
        for b, row in enumerate(rows):
            alone = model(torch.tensor([row + extra[0].tolist()]))[0][0]  # (T, V), no cache, no padding
            expected = alone[len(row) - 1 :]  # the logits after the prompt and after each extra token
            torch.testing.assert_close(torch.stack([s[b] for s in steps]), expected, atol=1e-5, rtol=1e-5)


def test_next_token_logits_are_the_last_position_of_the_full_forward():
    model = tiny_gpt(32).eval()
    idx = torch.randint(0, 30, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(engine.next_token_logits(model, idx), model(idx)[0][:, -1], atol=1e-6, rtol=0)


def uneven_prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 30, (int(k),), generator=g).tolist() for k in torch.randint(1, 13, (n,), generator=g)]


@pytest.mark.parametrize("method", [None, "lora", "prefix_tuning"])
def test_a_prefill_in_groups_leaves_what_one_pass_over_the_batch_leaves(method):
    """The same next-token logits, key mask, token counts and keys and values at every real position, then the same
    logits for three more tokens decoded from either cache."""
    model = tiny_gpt(32).eval()
    if method:
        config = peft.LoraConfig(r=4) if method == "lora" else peft.PrefixTuningConfig(num_virtual_tokens=3)
        model = peft.get_peft_model(model, config).eval()
    ids, mask = engine.left_pad(uneven_prompts(11), PAD)
    mask = mask.bool()
    one, grouped = engine.KVCache(model.config.n_layer, 32), engine.KVCache(model.config.n_layer, 32)
    extra = torch.randint(0, 30, (11, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        steps_one = [engine.next_token_logits(model, ids, mask, one)]
        steps_grouped = [engine.prefill_in_groups(model, ids, mask, grouped, groups=3)]
        assert torch.equal(grouped.key_mask, one.key_mask) and torch.equal(grouped.n_seen, one.n_seen)
        assert len(grouped) == len(one) == ids.size(1)
        for a, b in zip(one.layers, grouped.layers):
            real = mask[:, None, :, None].expand_as(a.k[:, :, : len(one)])  # (B, nh, T, hs)
            torch.testing.assert_close(b.k[:, :, : len(one)][real], a.k[:, :, : len(one)][real], atol=1e-5, rtol=0)
            torch.testing.assert_close(b.v[:, :, : len(one)][real], a.v[:, :, : len(one)][real], atol=1e-5, rtol=0)
        for t in range(3):
            steps_one.append(engine.next_token_logits(model, extra[:, t : t + 1], None, one))
            steps_grouped.append(engine.next_token_logits(model, extra[:, t : t + 1], None, grouped))
    torch.testing.assert_close(torch.stack(steps_grouped), torch.stack(steps_one), atol=1e-5, rtol=0)


def test_a_large_uneven_batch_completes_as_each_prompt_alone(monkeypatch):
    """Twelve prompts of 1 to 12 tokens: enough rows and padding for the grouped prefill, each row as if alone."""
    model = tiny_gpt(32).eval()
    prompts = uneven_prompts(12, seed=2)
    calls, prefill = [], engine.prefill_in_groups
    monkeypatch.setattr(engine, "prefill_in_groups", lambda *a, **k: calls.append(1) or prefill(*a, **k))
    out = engine.complete(model, prompts, 5, EOS, PAD)
    assert calls == [1]  # the prompt step ran in groups
    for b, p in enumerate(prompts):
        assert out.responses()[b] == [t for t in greedy_by_hand(model, p, 5) if t != EOS], b


def spy_on_keep_rows(monkeypatch) -> list[int]:
    """The number of rows kept at each KVCache.keep_rows call."""
    kept, keep = [], engine.KVCache.keep_rows
    monkeypatch.setattr(engine.KVCache, "keep_rows", lambda self, rows: kept.append(len(rows)) or keep(self, rows))
    return kept


def test_rows_that_finish_leave_the_batch_and_every_row_completes_as_alone(monkeypatch):
    """Rows emit eos at different steps; once a quarter of the cached rows have, the cache drops them
    (KVCache.keep_rows) and later steps compute only the others. Every row's greedy response is still what full
    forward passes over it alone give."""
    model = tiny_gpt(32).eval()
    pool = uneven_prompts(96, seed=3)
    alone = [greedy_by_hand(model, p, 10) for p in pool]  # EOS (30) never comes greedily from this model
    firsts = {tok: [a.index(tok) for a in alone if tok in a] for tok in range(30)}
    eos = max(firsts, key=lambda tok: (len(set(firsts[tok])), len(firsts[tok])))  # reached at the most steps
    rows = [i for i, a in enumerate(alone) if eos in a] + [i for i, a in enumerate(alone) if eos not in a][:5]
    prompts = [pool[i] for i in rows]
    expected = [alone[i][: alone[i].index(eos)] if eos in alone[i] else alone[i] for i in rows]
    assert len(set(firsts[eos])) >= 4 and len(rows) >= 12  # rows finish at several steps, five never
    kept = spy_on_keep_rows(monkeypatch)
    out = engine.complete(model, prompts, 10, eos, PAD)
    ends = [alone[i].index(eos) if eos in alone[i] else 99 for i in rows]  # the step each row emits eos at
    cached, expected_kept = len(rows), []
    for step in range(9):  # after each step but the last: drop once a quarter of the cached rows have finished
        left = sum(e > step for e in ends)
        if 4 * (cached - left) >= cached:
            cached = left
            expected_kept.append(left)
    assert kept == expected_kept and len(kept) >= 2
    assert out.responses() == expected
    top1 = engine.complete(model, prompts, 10, eos, PAD, temperature=1.0, top_k=1, logprobs=True)
    assert top1.responses() == expected  # top_k = 1 is greedy, and each token has probability 1 (log-prob 0)
    assert torch.equal(top1.logprobs, torch.zeros_like(top1.logprobs))  # 0 after eos too, not -inf * 0


@pytest.mark.parametrize("method", [None, "lora", "prefix_tuning", "prompt_tuning"])
def test_dropping_finished_rows_changes_no_sampled_token(monkeypatch, method):
    """The same seed gives the same tokens and log-probabilities with finished rows dropped and with every row
    decoded to the end (DROP_FINISHED off); with and without a PEFT method."""
    model = tiny_gpt(32).eval()
    if method:
        config = {"lora": peft.LoraConfig(r=4), "prefix_tuning": peft.PrefixTuningConfig(num_virtual_tokens=3),
                  "prompt_tuning": peft.PromptTuningConfig(num_virtual_tokens=3)}[method]
        model = peft.get_peft_model(model, config).eval()
        with torch.no_grad():  # adapters that change the output (LoRA's B starts at zero)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    prompts = uneven_prompts(16, seed=4)
    kept = spy_on_keep_rows(monkeypatch)
    dropped = engine.complete(model, prompts, 24, EOS, PAD, temperature=1.2, top_p=0.95, seed=0, logprobs=True)
    calls = len(kept)
    assert calls  # rows left the batch
    monkeypatch.setattr(engine, "DROP_FINISHED", False)
    every = engine.complete(model, prompts, 24, EOS, PAD, temperature=1.2, top_p=0.95, seed=0, logprobs=True)
    assert len(kept) == calls  # every row decoded to the end
    assert 4 <= int(dropped.has_eos.sum()) < 16
    assert torch.equal(dropped.tokens, every.tokens)
    assert torch.isfinite(dropped.logprobs).all()  # 0 after eos, whatever the fill token's probability
    torch.testing.assert_close(dropped.logprobs, every.logprobs, atol=1e-5, rtol=0)


def test_a_mixed_task_batch_keeps_its_rows(monkeypatch):
    """With peft.task_ids, Prefix-Tuning's layers pick each row's prefix by its place in the batch: no row leaves
    it, and each row still decodes as it would alone with its task."""
    model = peft.get_peft_model(tiny_gpt(32), peft.PrefixTuningConfig(num_virtual_tokens=3, num_tasks=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    prompts, tasks = uneven_prompts(16, seed=4), [b % 2 for b in range(16)]
    kept = spy_on_keep_rows(monkeypatch)
    with peft.task_ids(model, tasks):
        out = engine.complete(model, prompts, 24, EOS, PAD, temperature=1.2, seed=0)
    assert not kept and 4 <= int(out.has_eos.sum()) < 16  # a quarter finished, yet nothing was dropped
    with peft.task_ids(model, tasks):
        greedy = engine.complete(model, prompts, 24, EOS, PAD, temperature=0)
    for b in (0, 1, 5):
        with peft.task_ids(model, [tasks[b]]):
            alone = engine.complete(model, [prompts[b]], 24, EOS, PAD, temperature=0)
        assert greedy.responses()[b] == alone.responses()[0]


def test_top_p_keeps_the_smallest_set_that_reaches_p_and_a_large_top_k_keeps_all():
    """sampling_logits by hand on four tokens of probabilities 0.15, 0.5, 0.05, 0.3 (not in sorted order)."""
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    for top_p, kept in [(0.4, [0, 1, 0, 0]), (0.7, [0, 0.5, 0, 0.3]), (0.9, [0.15, 0.5, 0, 0.3])]:
        expected = torch.tensor([kept]) / sum(kept)
        got = engine.sampling_logits(probs.log(), 1.0, top_p=top_p).softmax(-1)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    for top_k in (4, 10):  # the whole vocabulary, or more than it
        torch.testing.assert_close(engine.sampling_logits(probs.log(), 1.0, top_k=top_k).softmax(-1), probs)


def test_sampled_tokens_follow_the_tempered_top_k_distribution():
    """20,000 draws at temperature 2 with top_k 3: frequencies within 0.02 of p ** (1 / 2) over the top three."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    tokens = engine.sample_next_token(probs.log().expand(20_000, 4), temperature=2.0, top_k=3,
                                      generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([0.5 ** 0.5, 0.3 ** 0.5, 0.15 ** 0.5, 0.0])
    torch.testing.assert_close(torch.bincount(tokens, minlength=4) / 20_000, weights / weights.sum(), atol=0.02, rtol=0)


def test_generate_fills_a_finished_row_with_pad_or_else_eos():
    """Row 0 greedily emits 3, 3, 12: with eos 12 its later tokens are pad_token_id (eos when there is none)."""
    model = tiny_gpt(32).eval()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    first, second = greedy_by_hand(model, [1, 2, 3], 6), greedy_by_hand(model, [4, 5, 6], 6)
    assert first[:3] == [3, 3, 12] and 12 not in second  # row 1 never finishes
    for pad, fill in [(PAD, PAD), (None, 12)]:
        out = engine.generate(model, idx, 6, temperature=0, eos_token_id=12, pad_token_id=pad)
        assert out[:, 3:].tolist() == [[3, 3, 12, fill, fill, fill], second], pad
