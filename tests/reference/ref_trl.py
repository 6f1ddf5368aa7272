"""Reference side of tests/test_parity_rl.py: trl's own DPO and GRPO losses on the tensors the test hands over.

Runs in .venv-ref (see bridge.py), trl 1.16.0 (checked first). One process serves every case of the test module, so
trl is imported once.

trl 1.16 has no free-standing loss functions: the DPO loss and the GRPO loss are the bodies of the trainers' private
methods ``DPOTrainer._compute_loss(self, model, inputs, return_outputs)`` (trl/trainer/dpo_trainer.py) and
``GRPOTrainer._compute_loss(self, model, inputs)`` (trl/trainer/grpo_trainer.py), which run the model and then the
loss. They are called here *unbound*, as trl's own code, on a small stand-in ``self`` (a trainer needs a model, a
tokenizer and a dataset): it carries exactly the attributes those methods read, each copied from a real
``DPOConfig`` / ``GRPOConfig`` the way the trainers' ``__init__`` copies it (dpo_trainer.py lines 801-818,
grpo_trainer.py lines 782-850 and 945-983), an accelerator of one process (gather, reduce: the identity), and in
place of the model:

DPO     a callable standing in for the model with trl's fused LM head (``model(..., labels=, fused_lm_head=True)``):
        it returns trl's ``FusedCausalLMOutput`` whose ``log_probs`` are the given per-token log-probabilities, zero
        where the shifted label is -100, as that output's contract states (trl/trainer/utils.py, FusedCausalLMOutput).
        trl then sums them per sequence, splits the batch [chosen; rejected], reads the reference's summed
        log-probabilities from the inputs (precompute_ref_log_probs=True) and computes loss_type "sigmoid".
GRPO    ``_get_per_token_logps_and_entropies`` is overridden to return the given per-token log-probabilities (the
        model's forward); everything after it (ratio, clip, k3 KL, the aggregation of each loss_type) is trl's.

Advantages: trl computes them inside ``GRPOTrainer._generate_and_score_completions`` (after sampling and scoring),
not in a separable function, so ``group_advantages`` below states its lines as trl's source does
(grpo_trainer.py lines 2765-2788, multi_objective_aggregation "sum_then_normalize", one reward function, one
process), with trl's own ``nanstd`` (trl/trainer/utils.py).

args:
    dpo         [{name, beta}]
    grpo        [{name, loss_type, beta, epsilon, max_completion_length, use_bias_correction_kl}]
    advantages  [{name, num_generations, scale_rewards}]
inputs ("<case>:<tensor>"):
    DPO         logps (2B, T) per-token policy log-probs, rows [chosen; rejected]; mask (2B, T) 1 on response tokens;
                ref_chosen, ref_rejected (B,) summed reference log-probs
    GRPO        logps, old_logps, ref_logps, mask (B, T); advantages (B,)
    advantages  rewards (N,)
outputs:
    DPO         <case>.loss, <case>.grad (d loss / d logps), <case>.rewards_chosen / rewards_rejected /
                rewards_accuracy / rewards_margin / logps_chosen / logps_rejected (trl's logged metrics)
    GRPO        <case>.loss, <case>.grad, <case>.kl (when beta != 0), <case>.clip_region / clip_low / clip_high
    advantages  <case>.advantages (N,), <case>.is_std_zero (N,)
"""

import tempfile
from collections import defaultdict
from types import SimpleNamespace

import ref_io
import torch

TRL_VERSION = "1.16.0"


def check_trl():
    import trl

    if trl.__version__ != TRL_VERSION:
        raise ImportError(f"trl {trl.__version__} in .venv-ref, these cases were written against {TRL_VERSION}: "
                          "rerun tests/reference/setup.sh")


check_trl()
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput, nanstd  # noqa: E402

OUT_DIR = tempfile.mkdtemp(prefix="trl-args-")  # TrainingArguments wants one; nothing is written to it


class OneProcess:
    """The accelerator of a single process: gathering and reducing change nothing."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def metrics_store():
    return {"train": defaultdict(list), "eval": defaultdict(list)}


# -- DPO -------------------------------------------------------------------------------------------------------


class FusedHead:
    """Stands in for a model patched with trl's add_fused_lm_head, called with fused_lm_head=True."""

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps  # (2B, T): position t scores label input_ids[:, t + 1]

    def __call__(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head, "trl's DPO calls the model with fused_lm_head=True"
        label_mask = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.per_token_logps)
        return FusedCausalLMOutput(
            log_probs=torch.where(label_mask, self.per_token_logps, zeros), entropy=zeros.detach(),
            mean_logits=zeros.detach(), is_top1=torch.zeros_like(label_mask), label_mask=label_mask)


def dpo_stand_in(beta):
    args = DPOConfig(output_dir=OUT_DIR, beta=beta, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                     use_cpu=True, bf16=False, report_to="none")
    return SimpleNamespace(  # as DPOTrainer.__init__ sets them (dpo_trainer.py lines 801-818, 905, 966-974)
        args=args, model=SimpleNamespace(training=True), accelerator=OneProcess(), beta=args.beta,
        precompute_ref_logps=args.precompute_ref_log_probs, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting, aux_loss_enabled=False,
        _metrics=metrics_store(), _total_train_tokens=0, _tp_size=1)


def run_dpo(case, inputs):
    name = case["name"]
    logps = inputs[f"{name}:logps"].clone().requires_grad_(True)
    mask = inputs[f"{name}:mask"]
    n_rows, T = logps.shape
    completion_mask = torch.cat([torch.zeros(n_rows, 1, dtype=torch.long), mask.long()], 1)  # (2B, T + 1)
    batch = {"input_ids": torch.arange(T + 1).repeat(n_rows, 1), "attention_mask": torch.ones_like(completion_mask),
             "completion_mask": completion_mask, "ref_chosen_logps": inputs[f"{name}:ref_chosen"],
             "ref_rejected_logps": inputs[f"{name}:ref_rejected"]}
    trainer = dpo_stand_in(case["beta"])
    loss = DPOTrainer._compute_loss(trainer, FusedHead(logps), batch, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, logps)
    logged = trainer._metrics["train"]
    out = {f"{name}.loss": loss.detach(), f"{name}.grad": grad}
    for ours, theirs in [("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                         ("rewards_accuracy", "rewards/accuracies"), ("rewards_margin", "rewards/margins"),
                         ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")]:
        (value,) = logged[theirs]
        out[f"{name}.{ours}"] = torch.tensor(value, dtype=torch.float64)
    return out


# -- GRPO ------------------------------------------------------------------------------------------------------


def grpo_stand_in(case, per_token_logps):
    args = GRPOConfig(output_dir=OUT_DIR, loss_type=case["loss_type"], beta=case["beta"], epsilon=case["epsilon"],
                      max_completion_length=case["max_completion_length"],
                      use_bias_correction_kl=case["use_bias_correction_kl"], use_cpu=True, bf16=False,
                      report_to="none")
    trainer = SimpleNamespace(  # as GRPOTrainer.__init__ sets them (grpo_trainer.py lines 782-850, 945-946, 983)
        args=args, model=SimpleNamespace(training=True), accelerator=OneProcess(), beta=args.beta,
        loss_type=args.loss_type, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        max_completion_length=args.max_completion_length, importance_sampling_level=args.importance_sampling_level,
        off_policy_mask_threshold=args.off_policy_mask_threshold, top_entropy_quantile=args.top_entropy_quantile,
        use_vllm=args.use_vllm, vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        entropy_coef=args.entropy_coef, use_adaptive_entropy=args.use_adaptive_entropy,
        _entropy_bonus_enabled=args.entropy_coef != 0.0 or args.use_adaptive_entropy, aux_loss_enabled=False,
        current_gradient_accumulation_steps=args.gradient_accumulation_steps, _metrics=metrics_store())

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert per_token_logps.size(1) == logits_to_keep
        return per_token_logps, torch.zeros_like(per_token_logps).detach(), None

    trainer._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    return trainer


def run_grpo(case, inputs):
    name = case["name"]
    logps = inputs[f"{name}:logps"].clone().requires_grad_(True)
    mask = inputs[f"{name}:mask"]
    B, T = logps.shape
    batch = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
             "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
             "advantages": inputs[f"{name}:advantages"], "old_per_token_logps": inputs[f"{name}:old_logps"],
             "ref_per_token_logps": inputs[f"{name}:ref_logps"],
             # the completion tokens of the whole generation batch (grpo_trainer.py line 2498): this one batch
             "num_items_in_batch": mask.sum()}
    trainer = grpo_stand_in(case, logps)
    loss = GRPOTrainer._compute_loss(trainer, None, batch)
    (grad,) = torch.autograd.grad(loss, logps)
    logged = trainer._metrics["train"]
    out = {f"{name}.loss": loss.detach(), f"{name}.grad": grad}
    if case["beta"] != 0.0:
        out[f"{name}.kl"] = torch.tensor(logged["kl"][0], dtype=torch.float64)
    for ours, theirs in [("clip_region", "clip_ratio/region_mean"), ("clip_low", "clip_ratio/low_mean"),
                         ("clip_high", "clip_ratio/high_mean")]:
        out[f"{name}.{ours}"] = torch.tensor(logged[theirs][0], dtype=torch.float64)
    return out


def group_advantages(rewards, num_generations, scale_rewards):
    """trl 1.16.0, grpo_trainer.py lines 2765-2788 (GRPOTrainer._generate_and_score_completions), as written there:
    rewards (N,) of one reward function (weight 1), group after group; scale_rewards "group" or "none"."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        raise ValueError(f"scale_rewards {scale_rewards!r}: only 'group' and 'none' have a counterpart here")
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    advantages = torch.nan_to_num(advantages, nan=0.0)  # line 2810
    return advantages, is_std_zero


def main():
    inputs, args, work = ref_io.read()
    out = {}
    for case in args.get("dpo", []):
        out.update(run_dpo(case, inputs))
    for case in args.get("grpo", []):
        out.update(run_grpo(case, inputs))
    for case in args.get("advantages", []):
        name = case["name"]
        A, zero = group_advantages(inputs[f"{name}:rewards"], case["num_generations"], case["scale_rewards"])
        out[f"{name}.advantages"], out[f"{name}.is_std_zero"] = A, zero
    ref_io.write(work, out)


if __name__ == "__main__":
    main()
