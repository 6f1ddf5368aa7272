"""The course's concept figures, drawn by code with matplotlib (no image is drawn by hand).

    block_diagram(method)   a GPT block, with where a fine-tuning method acts drawn in orange (06a-06g, 07)
    pipeline_diagram()      the four stages: data, algorithm, model (01)
    rl_loop(kind)           one step of PPO, GRPO or DPO (09, 10, 11)
    mixed_task_batch()      model tuning against one frozen model serving a mixed-task batch (06b)

Each function returns the figure and saves it as figures/<name>.png beside the notebook that calls it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

HIGHLIGHT = "#f28e2b"  # where the method acts
PLAIN = "#e8eef6"  # the frozen model
EDGE = "#44546a"
FIGURES = Path("figures")

METHOD_NAMES = {
    "bitfit": "BitFit: every bias b",
    "prompt_tuning": "Prompt Tuning: n learned vectors P in front of the input",
    "p_tuning": "P-Tuning: P computed by a prompt encoder (bi-LSTM + MLP)",
    "prefix_tuning": "Prefix-Tuning: learned keys and values in every block (through an MLP while training)",
    "p_tuning_v2": "P-Tuning v2: learned keys and values in every block",
    "lora": "LoRA: a low-rank update BA beside chosen weight matrices (here W_q and W_v)",
    "ia3": "IA3: learned vectors rescale keys, values and the MLP's inner activations",
    "adapter": "Adapters (Houlsby): a bottleneck network after each sub-layer",
    None: "the frozen model",
}


def save(fig, name: str):
    FIGURES.mkdir(exist_ok=True)
    fig.savefig(FIGURES / f"{name}.png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return fig


def box(ax, x, y, w, h, text, color=PLAIN, fontsize=8, edge=EDGE, lw=1.0, style="round,pad=0.02,rounding_size=0.6"):
    """A rounded box with its lower-left corner at (x, y), text centred."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=color, ec=edge, lw=lw))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, start, end, color=EDGE, lw=1.0, style="-|>", rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=9, color=color, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))


def badge(ax, x, y, text):
    """A small orange label: a tensor the method adds or trains."""
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5, color="black",
            bbox=dict(boxstyle="round,pad=0.18", fc=HIGHLIGHT, ec="none"))


# -- where each fine-tuning method acts in a block -------------------------------------------------------------------


def block_diagram(method: str | None = None, name: str | None = None):
    """The GPT of this course (pre-LN blocks, as GPT-2), from token ids to logits, with what `method` adds or trains
    drawn in orange: one of METHOD_NAMES' keys, or None for the model alone."""
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHOD_NAMES)}")
    fig, ax = plt.subplots(figsize=(13, 4.2))
    ax.set_xlim(0, 100)
    ax.set_ylim(-1, 27)
    ax.axis("off")
    y, h = 9, 4  # the main line of boxes
    mid = y + h / 2
    # the input layer
    ax.text(1, mid, "token\nids x", ha="center", va="center", fontsize=8)
    box(ax, 3, y, 10, h, "input layer\n$W_e[x] + W_p$")
    arrow(ax, (2.2, mid), (3, mid))
    # one block (drawn once, repeated L times)
    ax.add_patch(Rectangle((15, 1.5), 69, 21.5, fill=False, ls="--", ec="grey", lw=1))
    ax.text(49.5, 24.2, "a block, repeated L times (the encoder)", ha="center", fontsize=9, color="grey")
    arrow(ax, (13, mid), (17, mid))
    box(ax, 17, y, 4, h, "$LN_1$")
    for i, (label, dy) in enumerate((("$W_q$", 5), ("$W_k$", 0), ("$W_v$", -5))):
        box(ax, 23, y + dy + 0.5, 5, 3, label)
        arrow(ax, (21, mid), (23, mid + dy), rad=0.0)
        arrow(ax, (28, mid + dy), (31, mid), rad=0.0)
    box(ax, 31, y, 10, h, "attention\nsoftmax$(QK^T/\\sqrt{d})V$", fontsize=7)
    box(ax, 43, y, 5, h, "$W_O$")
    arrow(ax, (41, mid), (43, mid))
    ax.text(51, mid, "⊕", ha="center", va="center", fontsize=16)
    arrow(ax, (48, mid), (50.2, mid))
    box(ax, 54, y, 4, h, "$LN_2$")
    arrow(ax, (51.8, mid), (54, mid))
    box(ax, 60, y, 5, h, "$W_1$\n($C \\to 4C$)")
    arrow(ax, (58, mid), (60, mid))
    box(ax, 67, y, 5, h, "GELU")
    arrow(ax, (65, mid), (67, mid))
    box(ax, 74, y, 5, h, "$W_2$\n($4C \\to C$)")
    arrow(ax, (72, mid), (74, mid))
    ax.text(81.5, mid, "⊕", ha="center", va="center", fontsize=16)
    arrow(ax, (79, mid), (80.7, mid))
    # residual paths over the top of each sub-layer
    for x0, x1 in ((16, 51), (52.5, 81.5)):
        ax.plot([x0, x0, x1], [mid, 20.5, 20.5], color=EDGE, lw=1)
        arrow(ax, (x1, 20.5), (x1, mid + 0.7))
    ax.text(33.5, 21.3, "residual", fontsize=7, color="grey", ha="center")
    # the output layer
    arrow(ax, (82.3, mid), (86, mid))
    box(ax, 86, y, 10, h, "output layer\n$LN_f$, head $W_e^T$")
    ax.text(98.5, mid, "logits", ha="center", va="center", fontsize=8, rotation=90)

    if method == "bitfit":
        for x, yy in ((25.5, y + 9), (25.5, y + 4), (25.5, y - 1), (45.5, y + 5), (19, y + 5), (56, y + 5),
                      (62.5, y + 5), (76.5, y + 5), (91, y + 5)):
            badge(ax, x, yy, "+b")
    elif method in ("prompt_tuning", "p_tuning"):
        box(ax, 3, 15.5, 10, 3.5, "P: n virtual\ntokens", color=HIGHLIGHT)
        arrow(ax, (8, 15.5), (8, y + h), color=HIGHLIGHT, lw=1.6)
        ax.text(8, 7.6, "$[P;\\ W_e[x]] + W_p$", ha="center", fontsize=7.5)
        if method == "p_tuning":
            box(ax, 3, 20.5, 10, 3.2, "bi-LSTM + MLP\n(prompt encoder)", color=HIGHLIGHT, fontsize=7.5)
            arrow(ax, (8, 20.5), (8, 19), color=HIGHLIGHT, lw=1.6)
    elif method in ("prefix_tuning", "p_tuning_v2"):
        box(ax, 31, 3.2, 4.6, 2.8, "$P_k$", color=HIGHLIGHT)
        box(ax, 36.4, 3.2, 4.6, 2.8, "$P_v$", color=HIGHLIGHT)
        arrow(ax, (33.3, 6), (33.3, y), color=HIGHLIGHT, lw=1.4)
        arrow(ax, (38.7, 6), (38.7, y), color=HIGHLIGHT, lw=1.4)
        ax.text(36, 2.2, "keys $[P_k; K]$, values $[P_v; V]$, in every block", ha="center", va="top", fontsize=7.5)
        if method == "prefix_tuning":
            box(ax, 43, 3.2, 9, 2.8, "MLP($P'$), while\ntraining", color=HIGHLIGHT, fontsize=7)
            arrow(ax, (43, 4.6), (41, 4.6), color=HIGHLIGHT, lw=1.4)
    elif method == "lora":
        for dy in (5, -5):
            box(ax, 23.5, y + dy + 3.6 if dy > 0 else y + dy - 2.4, 4, 2.2, "+$BA$", color=HIGHLIGHT, fontsize=7.5)
        ax.text(25.5, 0.3, "$W_0x + \\frac{\\alpha}{r}BAx$", ha="center", fontsize=8)
    elif method == "ia3":
        badge(ax, 29.6, y + 2.1 + 1.2, "⊙$l_k$")
        badge(ax, 29.6, y - 3.2, "⊙$l_v$")
        badge(ax, 73.0, y + h + 1.3, "⊙$l_{ff}$")
    elif method == "adapter":
        for x in (43, 74):
            box(ax, x - 0.5, 15, 6, 3.3, "adapter\n$m \\ll C$", color=HIGHLIGHT, fontsize=7.5)
            arrow(ax, (x + 2.5, y + h), (x + 2.5, 15), color=HIGHLIGHT, lw=1.4)
        ax.text(61, 4.2, "$h + W_{up} f(W_{down} h)$ after each sub-layer", ha="center", fontsize=7.5)
    ax.set_title(f"Where the method acts (orange): {METHOD_NAMES[method]}" if method else
                 "The GPT of this course: input layer, L blocks, output layer", fontsize=10)
    return save(fig, name or f"block_{method or 'model'}")


# -- the four stages -----------------------------------------------------------------------------------------------


STAGES = [
    ("预训练 pretraining", "raw text", "next-token prediction\non every token", "base model"),
    ("有监督微调 SFT", "instructions with\nwritten answers", "next-token prediction\non the answer tokens",
     "SFT model"),
    ("奖励模型 reward model", "preference pairs\n(prompt, chosen, rejected)", "a binary classifier of the\npair: "
     "Bradley-Terry loss", "reward model"),
    ("强化学习 RL", "prompts only; the\nresponses are sampled", "PPO (or GRPO, DPO)\nwith a KL penalty",
     "RL model"),
]


def _chinese_font():
    """A font with CJK glyphs when one is installed, else None (the Chinese stage names then show as boxes)."""
    from matplotlib import font_manager

    for name in ("Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "SimHei", "Microsoft YaHei",
                 "PingFang SC", "Source Han Sans SC", "AR PL UMing CN"):
        if any(f.name == name for f in font_manager.fontManager.ttflist):
            return name
    return None


def pipeline_diagram(name: str = "pipeline"):
    """The four stages, each with its data, algorithm and model; each stage starts from the model of the one
    before (the reward model and the RL stage both from the SFT model)."""
    font = _chinese_font()
    fig, ax = plt.subplots(figsize=(13, 4.4))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 30)
    ax.axis("off")
    colors = {"data": "#dbe9f6", "algorithm": "#fdf1cf", "model": "#d9f0d3"}
    for i, (stage, data, algorithm, model) in enumerate(STAGES):
        x = 1 + 25 * i
        title = stage if font else stage.split(" ", 1)[1]
        ax.text(x + 11, 28, title, ha="center", va="center", fontsize=10, weight="bold",
                fontfamily=font or "sans-serif")
        box(ax, x, 19.5, 22, 6, data, colors["data"])
        box(ax, x, 11, 22, 6, algorithm, colors["algorithm"])
        box(ax, x, 2.5, 22, 6, model, colors["model"], lw=1.6)
        arrow(ax, (x + 11, 19.5), (x + 11, 17))
        arrow(ax, (x + 11, 11), (x + 11, 8.5))
        if i < 3:
            arrow(ax, (x + 22, 5.5), (x + 25, 5.5), lw=1.6)
    for label, y in (("data", 22.5), ("algorithm", 14), ("model", 5.5)):
        ax.text(0.2, y, label, rotation=90, ha="right", va="center", fontsize=8, color="grey")
    ax.text(50, 0.3, "each stage starts from the model of the one before (the RL stage from the SFT model, scored by "
            "the reward model)",
            ha="center", fontsize=8, color="grey")
    ax.set_title("The four stages of a chat model", fontsize=11)
    return save(fig, name)


# -- one step of PPO, GRPO, DPO --------------------------------------------------------------------------------------


LOOPS = {
    "ppo": ("PPO: one step", [
        "prompts x\n(a batch)", "policy $\\pi_\\theta$ samples\na response y to each",
        "score s(x, y): reward\nmodel or checker",
        "per-token reward\n$r_t = -\\beta\\,KL_t$, + s at the end\n($KL_t$ to the frozen $\\pi_{ref}$)",
        "value head $V(s_t)$:\nGAE advantages $A_t$", "a few epochs of the\nclipped policy and\nvalue losses"]),
    "grpo": ("GRPO: one step (no value head)", [
        "prompts x", "policy samples a group\nof G responses to each",
        "rewards $r_1..r_G$\n(the checker)", "advantage of each response\n$A_i = (r_i - mean) / std$",
        "clipped ratio loss\n$- \\beta\\,KL$ to $\\pi_{ref}$ (k3),\nper token"]),
    "dpo": ("DPO: one step (no sampling, no reward model)", [
        "preference pairs\n$(x, y_c, y_r)$", "$\\log\\pi_\\theta(y|x)$ of both\nresponses (summed over tokens)",
        "$\\log\\pi_{ref}(y|x)$: the SFT\nmodel, computed once", "loss $-\\log\\sigma(\\beta[\\Delta_c - \\Delta_r])$\n"
        "$\\Delta = \\log\\pi_\\theta - \\log\\pi_{ref}$", "gradient step on $\\pi_\\theta$\n(the one training loop)"]),
}


def rl_loop(kind: str = "ppo", name: str | None = None):
    """One step of the alignment method `kind` ("ppo", "grpo" or "dpo") as boxes on a loop: the last box updates
    the policy that the first ones use."""
    if kind not in LOOPS:
        raise ValueError(f"kind must be one of {list(LOOPS)}, got {kind!r}")
    import math

    title, steps = LOOPS[kind]
    fig, ax = plt.subplots(figsize=(11, 4.6))
    ax.set_xlim(-55, 55)
    ax.set_ylim(-24, 24)
    ax.axis("off")
    n = len(steps)
    w, h = 22, 8
    centres = [(36 * math.cos(math.pi / 2 + 2 * math.pi * i / n), 15 * math.sin(math.pi / 2 + 2 * math.pi * i / n))
               for i in range(n)]
    centres = [(-x, y) for x, y in centres]  # clockwise
    for i, ((cx, cy), text) in enumerate(zip(centres, steps)):
        color = HIGHLIGHT if i == n - 1 else PLAIN
        box(ax, cx - w / 2, cy - h / 2, w, h, text, color, fontsize=8)
    for i in range(n):
        (x0, y0), (x1, y1) = centres[i], centres[(i + 1) % n]
        dx, dy = x1 - x0, y1 - y0
        norm = math.hypot(dx, dy)
        # leave each box at its edge: scale the centre-to-centre line so the arrow starts and ends outside the boxes
        t0 = min(w / 2 / max(abs(dx), 1e-9), h / 2 / max(abs(dy), 1e-9)) * 1.05
        start = (x0 + dx * t0, y0 + dy * t0)
        end = (x1 - dx * t0, y1 - dy * t0)
        if norm > 0:
            arrow(ax, start, end, lw=1.3, rad=-0.15, color=EDGE if i < n - 1 else HIGHLIGHT)
    ax.text(0, 0, "the updated policy\nsamples the next batch" if kind != "dpo" else "the next batch of pairs",
            ha="center", va="center", fontsize=8, color="grey")
    ax.set_title(title, fontsize=11)
    return save(fig, name or f"loop_{kind}")


# -- Prompt Tuning's mixed-task batch --------------------------------------------------------------------------------


def mixed_task_batch(name: str = "mixed_task_batch"):
    """Left: model tuning, one fine-tuned copy of the whole model per task, each serving a batch of its own task.
    Right: prompt tuning, one frozen model; each task is a small prompt, and one batch mixes the tasks, each row
    carrying its task's prompt (Lester et al. 2021, Figure 2)."""
    tasks = [("task A", "#4e79a7"), ("task B", "#e15759"), ("task C", "#59a14f")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for ax in (left, right):
        ax.set_xlim(0, 50)
        ax.set_ylim(0, 30)
        ax.axis("off")
    for i, (label, color) in enumerate(tasks):
        y = 22 - 9 * i
        for r in range(2):  # a batch of two rows of this task
            left.add_patch(Rectangle((2, y + 2.6 * r), 12, 2.2, fc=color, alpha=0.35, ec=color))
        left.text(8, y - 1.2, f"batch of {label}", ha="center", fontsize=7.5)
        arrow(left, (14.5, y + 2.4), (20, y + 2.4))
        left.add_patch(FancyBboxPatch((20, y - 0.5), 20, 5.8, boxstyle="round,pad=0.02,rounding_size=0.6",
                                      fc=color, ec=color, alpha=0.35))
        left.text(30, y + 2.4, f"model for {label}\n(a full copy, all weights tuned)", ha="center", va="center",
                  fontsize=7.5)
    left.set_title("Model tuning: one copy of the model per task,\nand a separate batch for each", fontsize=10)
    rows = [0, 1, 2, 0, 2, 1]
    for r, t in enumerate(rows):
        label, color = tasks[t]
        y = 25 - 3.6 * r
        right.add_patch(Rectangle((2, y), 3, 2.6, fc=color, ec=color))  # the task's prompt
        right.add_patch(Rectangle((5.4, y), 12, 2.6, fc=color, alpha=0.3, ec=color))  # the row's input
        right.text(11.4, y + 1.3, f"input of {label}", ha="center", va="center", fontsize=7)
    right.text(3.5, 28.6, "prompt", ha="center", fontsize=7.5)
    arrow(right, (18, 16), (24, 16))
    box(right, 24, 9.5, 22, 13, "one frozen model\n(the pretrained weights,\nshared by every task)", fontsize=8.5)
    right.text(24, 3, "each task stores only its prompt: n x d numbers", fontsize=8)
    right.set_title("Prompt tuning: one frozen model serves a batch\nthat mixes the tasks, each row with its prompt",
                    fontsize=10)
    return save(fig, name)
