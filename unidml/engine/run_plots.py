"""The PNG plots of one run (`RUN/plots/`), drawn from its metric history (metrics.json's `epochs`).

`recall_at_k.png`: Recall@K per evaluated epoch of the selection split (solid) and of the test split when
it is another one (dashed, marked as reported, not used to select), with the selected epoch marked.
`train_loss.png`: the epoch-mean training loss (and its tightness/contrast terms where the loss has them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend is chosen or needed
from matplotlib.ticker import MaxNLocator

Write = Callable[[Callable[[Path], None], Path], None]  # run_record.write_atomic: (write(tmp), path)


def _recall_keys(history: list[dict], split: str) -> list[int]:
    return sorted({int(k.split("@")[1]) for entry in history for k in entry.get("splits", {}).get(split, {})
                   if k.startswith("recall@")})


def plot_recall(history: list[dict], selection_split: str, best_epoch: int | None, path: Path,
                write: Write) -> Figure:
    """Recall@K against the epoch: the selection split, and the test split as reported alongside it."""
    epochs = [entry["epoch"] for entry in history]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    splits = [selection_split] + (["test"] if selection_split != "test" and any(
        "test" in entry.get("splits", {}) for entry in history) else [])
    for split, style in zip(splits, ("-", "--")):
        role = "selects the epoch" if split == selection_split else "reported, not used to select"
        for number, k in enumerate(_recall_keys(history, split)):
            values = [entry.get("splits", {}).get(split, {}).get(f"recall@{k}", float("nan")) for entry in history]
            ax.plot(epochs, values, style, marker="o", markersize=3, color=f"C{number}",
                    label=f"{split} R@{k}" + (f" ({role})" if number == 0 else ""))
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"selected epoch {best_epoch}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    write(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), path)
    return fig


def plot_train_loss(history: list[dict], path: Path, write: Write) -> Figure | None:
    """The epoch-mean training loss (epochs after training started); None when there is none to draw."""
    trained = [entry for entry in history if "train_loss" in entry]
    if not trained:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = [entry["epoch"] for entry in trained]
    for key in ("train_loss", "tightness", "contrast"):
        if all(key in entry for entry in trained):
            ax.plot(epochs, [entry[key] for entry in trained], marker="o", markersize=3, label=key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("epoch mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    write(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), path)
    return fig
