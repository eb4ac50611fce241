"""The plots lit-lora writes: loss curves of one run or of several, and where an adapter changed the model
(the heatmap of the size of LoRA's update per layer, from `lit_lora.methods.lora_update_norms`).

Every figure is written to a temporary name and renamed into place, like every other file.
"""

from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from lit_lora.files.checkpoint import atomic_path
from lit_lora.files.utils import PathLike


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:  # a temporary name, then renamed: never a half-written picture
        fig.savefig(tmp, dpi=120, format="png")
    _pyplot().close(fig)


def plot_loss_curves(results: Sequence[Any], path: PathLike,
                     title: str = "Finetuning loss: training (thin) and validation (dots)") -> Path:
    """Training loss (thin) and validation loss (dots) of every run (anything with `name` and `history`),
    one colour per method, on one figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, result in enumerate(r for r in results if r.history):
        color = f"C{index}"
        train = [(h["step"], h["train_loss"]) for h in result.history if "train_loss" in h]
        val = [(h["step"], h["val_loss"]) for h in result.history if "val_loss" in h]
        if train:
            ax.plot(*zip(*train), color=color, linewidth=0.8, alpha=0.45)
        if val:
            ax.plot(*zip(*val), "o-", color=color, linewidth=1.8, markersize=4, label=f"{result.name} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (response tokens)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return Path(path)


def plot_losses(history: List[Dict[str, float]], path: PathLike) -> None:
    """Training and validation loss against the optimizer step, as a PNG."""
    plt = _pyplot()
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, Path(path))


def plot_update_heatmap(projections: Sequence[str], layers: Sequence[str], norms: torch.Tensor, path: PathLike,
                        title: str = "Size of the LoRA update per layer and projection",
                        label: str = "s ||B A||_F (s = alpha / r, or alpha / sqrt(r))") -> Path:
    """Heatmap of an update's size per layer (columns) and projection (rows), e.g. LoRA's (alpha / r)
    ||B A||_F from `lit_lora.methods.lora_update_norms`: where finetuning changed the model. NaN cells stay empty."""
    plt = _pyplot()
    # at least 4 inches high: the colour bar's label stands beside it, also for one or two projections
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(layers) + 2.5), max(4.0, 0.55 * len(projections) + 1.8)))
    image = ax.imshow(norms.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), labels=layers)
    ax.set_yticks(range(len(projections)), labels=list(projections))
    ax.set_xlabel("layer")
    if len(layers) <= 16:  # the values themselves, where they fit
        finite = norms[torch.isfinite(norms)]
        middle = float(finite.max() + finite.min()) / 2 if finite.numel() else 0.0
        for row, values in enumerate(norms.tolist()):
            for column, value in enumerate(values):
                if value == value:  # not NaN: this layer has this projection adapted
                    ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_title(title)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return Path(path)
