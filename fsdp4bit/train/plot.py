"""The loss-curve PNG written at the end of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def plot_loss(metrics_path: Path, out_path: Path) -> None:
    """Training loss per step, the held-out loss before and after finetuning as dashed lines, and where it was also
    measured every ``train.eval_every`` steps, the held-out curve through all of those points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval" and r["when"] != "step"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in train], [_number(r["loss"]) for r in train], label="train loss")
    if any(r["when"] == "step" for r in records if r["event"] == "eval"):
        held_out = sorted((r["step"], _number(r["loss"])) for r in records if r["event"] == "eval")
        ax.plot(*zip(*held_out, strict=True), "o-", color="tab:purple", label="held-out loss")
    for record, color in zip(evals, ("tab:red", "tab:green"), strict=False):
        loss, ppl = _number(record["loss"]), _number(record["ppl"])
        ax.axhline(loss, ls="--", color=color, label=f"held-out {record['when']} (ppl {ppl:.1f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("QLoRA finetuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def _number(value: float | None) -> float:
    """A metrics value for plotting: null (a non-finite loss, e.g. a skipped step's) is NaN, a gap in the curve."""
    return float("nan") if value is None else value
