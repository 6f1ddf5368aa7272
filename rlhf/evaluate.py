"""An evaluation of a policy that a course can trust: every number with its standard error, on held-out prompts.

For each held-out prompt (an example with its reference answer):
- greedy accuracy: the greedy answer is exactly right (tasks.check_answer);
- sampled accuracy: the share of k samples (at the sampling temperature) that are exactly right;
- pass@k: at least one of the k samples is right;
- ground-truth score: the mean rubric score of the samples (tasks.ground_truth_score: 1 / 0.5 / 0.25 / 0);
- remarks: the share of samples holding one of the remarks some SFT demonstrations add after the answer ("12. I
  think that is right, but I am not sure."; tasks.has_remark), right answer or not;
- truncated: the share of samples cut off at max_new_tokens without an eos;
- KL to the reference: sum over the response of log pi(y_t) - log pi_ref(y_t) on the samples, a Monte-Carlo estimate
  of KL(pi || pi_ref) per response (k1; unbiased);
- reward-model score: the mean score of the samples, when a reward model is given.

Each is a mean over prompts of a per-prompt value; its standard error is the sample standard deviation of those
values over sqrt(number of prompts). Per task, the same for accuracy. ``over_seeds`` gives mean and standard deviation
across runs with different seeds.
"""

from __future__ import annotations

import math
import statistics

import torch

from minigpt import engine, tasks
from rlhf.policy import reference_of, response_logits, response_logprobs

METRICS = ("greedy_accuracy", "sampled_accuracy", "pass_at_k", "true_score", "remarks", "truncated", "kl",
           "rm_score", "response_len")


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean); the standard error of a single value is 0."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


@torch.no_grad()
def sequence_kl(model, reference, gen, temperature: float = 1.0) -> torch.Tensor:
    """(B,) sum over each response of log pi - log pi_ref at the sampled tokens (the sampling temperature's
    distributions). reference None: the model with its PEFT adapters disabled."""
    P = gen.prompt_len
    logp = response_logprobs(response_logits(model, gen.tokens, gen.attention_mask, P), gen.tokens, P, temperature)
    with reference_of(model, reference) as ref:
        ref_logp = response_logprobs(response_logits(ref, gen.tokens, gen.attention_mask, P), gen.tokens, P,
                                     temperature)
    return ((logp - ref_logp) * gen.response_mask).sum(-1)


def greedy_answers(model, tokenizer, examples: list[dict], max_new_tokens: int = 24, batch_size: int = 64) -> list:
    """The greedy answer text to each example's prompt."""
    model.eval()
    ids = [tokenizer.encode(ex["prompt"]) for ex in examples]
    return [tokenizer.decode(r) for r in engine.complete_all(model, ids, max_new_tokens, tokenizer.eos_token_id,
                                                             tokenizer.pad_token_id, batch_size)]


def evaluate_policy(model, tokenizer, examples: list[dict], k: int = 4, max_new_tokens: int = 24,
                    temperature: float = 1.0, seed: int = 0, with_kl: bool = False, reference=None, rm=None,
                    batch_size: int = 64) -> dict:
    """The metrics of the module docstring: {metric: {"mean", "se"}}, "by_task": {task: {metric: {"mean", "se"}}},
    and "greedy_answers" (the greedy answer text of each example). with_kl: measure the KL to reference (None: the
    model with its adapters disabled); rm: a reward model to score the samples with (None: no score)."""
    greedy = greedy_answers(model, tokenizer, examples, max_new_tokens, batch_size)
    ids = [tokenizer.encode(ex["prompt"]) for ex in examples]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    per = {m: [[] for _ in examples] for m in ("correct", "score", "remark", "truncated", "kl", "rm_score",
                                                "response_len")}
    order = [i for i in range(len(examples)) for _ in range(k)]  # each prompt k times
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        gen = engine.complete(model, [ids[i] for i in rows], max_new_tokens, eos, pad, temperature=temperature,
                              generator=generator)
        texts = [tokenizer.decode(r) for r in gen.responses()]
        kl = sequence_kl(model, reference, gen, temperature).tolist() if with_kl else None
        rm_scores = rm(gen.tokens, attention_mask=gen.attention_mask).tolist() if rm is not None else None
        for j, (i, text) in enumerate(zip(rows, texts)):
            per["correct"][i].append(float(tasks.check_answer(examples[i], text)))
            per["score"][i].append(tasks.ground_truth_score(examples[i], text))
            per["remark"][i].append(float(tasks.has_remark(text)))
            per["truncated"][i].append(float(not gen.has_eos[j]))
            per["response_len"][i].append(float(gen.response_mask[j].sum()))
            if kl is not None:
                per["kl"][i].append(kl[j])
            if rm_scores is not None:
                per["rm_score"][i].append(rm_scores[j])
    per["greedy_correct"] = [[float(tasks.check_answer(ex, a))] for ex, a in zip(examples, greedy)]
    out = summarize(per, [ex.get("task", "all") for ex in examples])
    out["greedy_answers"] = greedy
    out["k"] = k
    return out


def summarize(per: dict, tasks_of: list[str]) -> dict:
    """The metrics from per-prompt lists of per-sample values: per[name][i] lists prompt i's values of "correct",
    "score", "remark", "truncated", "response_len" (and "kl", "rm_score" when measured) over its samples, and
    "greedy_correct" its greedy answer's (one value)."""
    values = {  # one value per prompt
        "greedy_accuracy": [c[0] for c in per["greedy_correct"]],
        "sampled_accuracy": [statistics.fmean(c) for c in per["correct"]],
        "pass_at_k": [float(max(c)) for c in per["correct"]],
        "true_score": [statistics.fmean(s) for s in per["score"]],
        "remarks": [statistics.fmean(r) for r in per["remark"]],
        "truncated": [statistics.fmean(t) for t in per["truncated"]],
        "response_len": [statistics.fmean(n) for n in per["response_len"]],
    }
    for name in ("kl", "rm_score"):
        if per.get(name) and all(per[name]):
            values[name] = [statistics.fmean(v) for v in per[name]]
    out = {m: dict(zip(("mean", "se"), mean_se(v))) for m, v in values.items()}
    out["per_prompt"] = values  # for paired comparisons of two evaluations on the same prompts (gain)
    out["by_task"] = {}
    for task in sorted(set(tasks_of)):
        idx = [i for i, t in enumerate(tasks_of) if t == task]
        out["by_task"][task] = {m: dict(zip(("mean", "se"), mean_se([values[m][i] for i in idx])))
                                for m in ("greedy_accuracy", "sampled_accuracy", "true_score")}
    out["n_prompts"] = len(tasks_of)
    return out


def gain(before: dict, after: dict, metric: str = "greedy_accuracy") -> dict:
    """{"mean", "se"} of after - before on the same prompts: the standard error of the paired differences, smaller
    than either evaluation's own when most prompts do not change."""
    diffs = [a - b for a, b in zip(after["per_prompt"][metric], before["per_prompt"][metric])]
    return dict(zip(("mean", "se"), mean_se(diffs)))


def gain_over_seeds(before: list[float], afters: list[list[float]]) -> dict:
    """{"mean", "se"} of the per-prompt change averaged over runs (one per seed, the same prompts): d_i = the mean
    over runs of after_run[i], less before[i]. Its standard error is over prompts, as in gain; averaging the runs
    first takes the spread between seeds out of each prompt's value, not the spread between prompts."""
    diffs = [statistics.fmean(run[i] for run in afters) - b for i, b in enumerate(before)]
    return dict(zip(("mean", "se"), mean_se(diffs)))


def held_out(run, pol, rm=None, max_new_tokens: int = 24):
    """A function that evaluates the policy pol (rlhf.policy.Policy) on run.eval_prompts built-in held-out prompts,
    with run.eval_samples samples each at run.eval_temperature, the KL to its reference and rm's scores; None when
    run.eval_prompts is 0."""
    if not run.eval_prompts:
        return None
    from rlhf.prompts import builtin_prompts

    test = builtin_prompts(n_test=run.eval_prompts)[1]
    return lambda: evaluate_policy(pol.model, pol.tokenizer, test, k=run.eval_samples, max_new_tokens=max_new_tokens,
                                   temperature=run.eval_temperature, with_kl=True, reference=pol.reference, rm=rm)


def over_seeds(results: list[dict]) -> dict:
    """{metric: {"mean", "sd"}} across runs (the standard deviation of the runs' means; 0 for one run)."""
    out = {}
    for m in METRICS:
        runs = [r[m]["mean"] for r in results if m in r]
        if runs:
            out[m] = {"mean": statistics.fmean(runs), "sd": statistics.stdev(runs) if len(runs) > 1 else 0.0}
    return out


def fmt(metric: dict, digits: int = 3, percent: bool = False) -> str:
    """"0.452 ± 0.035" (or in percent) from {"mean", "se"} or {"mean", "sd"}."""
    spread = metric.get("se", metric.get("sd", 0.0))
    if percent:
        return f"{100 * metric['mean']:.1f}% ± {100 * spread:.1f}"
    return f"{metric['mean']:.{digits}f} ± {spread:.{digits}f}"
