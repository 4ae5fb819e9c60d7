"""Matplotlib figures (Agg backend, PNG): sense readout tables, α heatmaps, contribution heatmaps.

Needs matplotlib (``pip install 'backpack-gpt2[eval]'``); importing this module without it raises an ImportError
that says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ._optional import import_optional
from .explain import Explanation
from .files import atomic_file
from .senses import SenseReadout

matplotlib = import_optional("matplotlib", "figures (backpack.plots, the command line's --png)")
matplotlib.use("Agg")  # headless: figures are only ever saved

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def plot_sense_readout(readout: SenseReadout, top_k: int = 5) -> Figure:
    """A table figure: one column per word, one row per sense, each cell the sense's top words (E·C(x)ℓ)."""
    words = [w.describe(readout.policy) for w in readout.words]
    cells = [[" ".join(repr(t) for t, _ in readout.top[w][s][:top_k]) for w in range(len(words))]
             for s in range(len(readout.senses))]
    width = max(6.0, 2.8 * len(words) + 1.0)
    figure, axis = plt.subplots(figsize=(width, 0.4 * len(readout.senses) + 1.2))
    axis.axis("off")
    table = axis.table(cellText=cells, rowLabels=[f"sense {s}" for s in readout.senses], colLabels=words,
                       loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.3)
    axis.set_title(f"Top {top_k} words of E·C(x)[ℓ] per sense")
    figure.tight_layout()
    return figure


def plot_contextualization(alpha: torch.Tensor, tokens: Sequence[str], senses: Sequence[int] | None = None
                           ) -> Figure:
    """α[ℓ] heatmaps (query i x key j) for a sentence, one panel per sense. α: (k, n, n)."""
    chosen = list(range(alpha.shape[0])) if senses is None else list(senses)
    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    size = max(2.5, 0.28 * len(tokens) + 1.0)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    for panel, axis in enumerate(axes.flat):
        if panel >= len(chosen):
            axis.axis("off")
            continue
        sense = chosen[panel]
        image = axis.imshow(alpha[sense].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        axis.set_title(f"α, sense {sense}", fontsize=9)
        axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        axis.set_yticks(range(len(labels)), labels, fontsize=6)
        axis.set_xlabel("key j (word whose sense is used)", fontsize=7)
        axis.set_ylabel("query i (predicting i+1)", fontsize=7)
    figure.colorbar(image, ax=axes, shrink=0.6)
    return figure


def plot_contributions(explanation: Explanation) -> Figure:
    """Heatmap of contribution[ℓ, j] = α[ℓ,i,j]·(E_w·C(x_j)[ℓ]) (senses x context words), diverging colours."""
    values = explanation.contributions.float()
    bound = float(values.abs().max()) or 1.0
    labels = [t.replace("\n", "\\n") for t in explanation.tokens[: values.shape[1]]]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.45 * len(labels) + 2), 0.3 * values.shape[0] + 1.8))
    image = axis.imshow(values.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    axis.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    axis.set_yticks(range(values.shape[0]), [f"sense {s}" for s in range(values.shape[0])], fontsize=7)
    target = explanation.target.describe("first")
    if explanation.contrast is not None:
        target += f" vs {explanation.contrast.describe('first')}"
    axis.set_title(f"Contributions to logit {target} (sum {explanation.total:+.3f})", fontsize=9)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure


def check_output_path(path: str, what: str = "figure") -> Path:
    """`path` as a Path if a file can be written there, else ValueError naming the problem.

    Checked before any work is done, so that a typo in a folder name costs nothing and writes nothing: the path
    must be non-empty and not a folder, its folder must exist and be writable, and its extension (if any) a format
    matplotlib writes.
    """
    if not path or not str(path).strip():
        raise ValueError(f"empty output path for the {what}")
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"output path {str(target)!r} for the {what} is a folder; give a file name")
    if not folder.is_dir():
        raise ValueError(f"cannot write the {what} {str(target)!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the {what} {str(target)!r}: folder {str(folder)!r} is not writable")
    image_format = target.suffix[1:].lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if image_format not in supported:
        raise ValueError(f"cannot write the {what} as {image_format!r}: use one of {sorted(supported)}")
    return target


def save_figure(figure: Figure, path: str, dpi: int = 120) -> str:
    """Write `figure` atomically (PNG unless the extension names another format) and close it; returns the path.

    The image goes to a temporary file in the same folder, is flushed to disk, then renamed over `path`: an
    interrupted save never leaves a truncated image under the final name.
    """
    try:
        target = check_output_path(path)
        with atomic_file(target, "wb") as handle:
            figure.savefig(handle, format=target.suffix[1:].lower() or "png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(figure)
    return str(path)
