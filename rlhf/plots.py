"""The pictures of the RL stages: reward histograms, and every logged metric of a PPO, GRPO or DPO run.

Each is drawn on a matplotlib Figure of its own and written to a file, not through pyplot: no display is needed, and
the backend of a notebook (or of any program that imports the library) is left as it was."""

from __future__ import annotations

import torch


def plot_reward_histogram(r_chosen, r_rejected, path, title: str = "Rewards of held-out pairs") -> None:
    """Overlaid histograms of the rewards of the chosen and the rejected responses."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    both = torch.cat([r_chosen, r_rejected])
    bins = torch.linspace(both.min().item(), both.max().item() + 1e-6, 41).tolist()
    ax.hist(r_chosen.tolist(), bins=bins, alpha=0.6, label=f"chosen (mean {r_chosen.mean():.2f})")
    ax.hist(r_rejected.tolist(), bins=bins, alpha=0.6, label=f"rejected (mean {r_rejected.mean():.2f})")
    ax.set_xlabel("reward r(x, y)")
    ax.set_ylabel("number of responses")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


PPO_PANELS = [  # (title, [(metric, label)], y label): everything train_ppo logs, one panel each
    ("scores", [("score", "reward score"), ("true_score", "ground-truth score")], "mean over the batch"),
    ("KL to the reference", [("kl", "KL(pi || pi_ref) per response"), ("beta", "beta")], "nats"),
    ("total reward", [("total_reward", "score - beta * KL")], "per response"),
    ("entropy", [("entropy", "policy entropy")], "nats per token"),
    ("approx KL (old -> new)", [("approx_kl", "approx KL")], "nats per token"),
    ("clip fraction", [("clipfrac", "policy ratio clipped"), ("vf_clipfrac", "value clipped")], "share of tokens"),
    ("value loss", [("value_loss", "clipped value loss")], "loss"),
    ("explained variance", [("explained_variance", "1 - Var(returns - V) / Var(returns)")], ""),
    ("response length", [("response_len", "tokens"), ("truncated", "share cut off (x 10)")], "tokens"),
]


def plot_metrics(rows: list[dict], path, panels, title: str, xlabel: str = "step") -> None:
    """One panel per entry of panels, each metric of it against rows' "step" (a metric not logged is left out)."""
    from matplotlib.figure import Figure

    cols = 3
    rows_of_panels = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(13, 3 * rows_of_panels))
    axes = fig.subplots(rows_of_panels, cols, squeeze=False)
    for ax, (name, metrics, ylabel) in zip(axes.flat, panels):
        for key, label in metrics:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]  # evaluations are not every step
            if points:
                scale = 10 if "x 10" in label else 1
                ax.plot([s for s, _ in points], [scale * v for _, v in points], "o-" if len(points) < len(rows)
                        else "-", ms=3, label=label)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_ppo(rows: list[dict], path, title: str = "PPO") -> None:
    """Every metric train_ppo logs, over PPO steps."""
    plot_metrics(rows, path, PPO_PANELS, title, "PPO step")
