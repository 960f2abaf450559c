"""What each layer lost, from the output folder's `ream_manifest.json`: a table (`ream-hf report OUTPUT`) and a
PNG plot (`layer_report.png`, written by every save and embedded in the model card).

Per MoE layer, from statistics the run already has:
- the share of the calibration's routing weight that went to the experts the layer keeps (the groups' centroids:
  for pruning the surviving experts, for merging the experts the others were merged into): what the router
  sent to experts that are gone or folded into another;
- the layer output's relative error on held-out calibration sequences before and after the down-projection
  refit (the manifest's `refit` entry; absent when no refit ran);
- the sizes of the merge groups (how many source experts each output expert stands for).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.names import MANIFEST_NAME

logger = logging.getLogger(__name__)

LAYER_PLOT_NAME = "layer_report.png"


@dataclass(frozen=True)
class LayerLoss:
    """One MoE layer's row of the report."""

    layer: str  # the manifest's key, e.g. "model.layers.3"
    index: int
    experts_before: int
    experts_after: int
    kept_mass: float  # share (0..1) of the calibration routing mass on the kept experts
    mass_basis: str  # "routing weight", or "frequency" (top-k selections) for manifests without routing weights
    group_sizes: tuple[int, ...]  # per output expert: how many source experts its group holds
    heldout_error_before: float | None  # the refit's held-out relative output error; None without a refit
    heldout_error_after: float | None

    @property
    def size_counts(self) -> list[tuple[int, int]]:
        """(group size, number of output experts with it), smallest size first."""
        return sorted(Counter(self.group_sizes).items())


def layer_losses(manifest: dict[str, Any]) -> list[LayerLoss]:
    """The report's rows, from a manifest (the dict `ReamCompressor.manifest()` returns or `ream_manifest.json`)."""
    rows = []
    for entry in manifest.get("layers") or []:
        groups = entry.get("groups") or []
        mass, basis = entry.get("routing_weight"), "routing weight"
        if mass is None:
            mass, basis = entry.get("frequency") or [], "frequency"
        total = float(sum(mass))
        kept = sum(float(mass[g["centroid"]]) for g in groups) / total if total > 0 else 0.0
        refit = entry.get("refit") or {}
        rows.append(LayerLoss(
            layer=str(entry.get("layer")), index=int(entry.get("index", len(rows))),
            experts_before=int(entry.get("experts_before", len(mass))),
            experts_after=int(entry.get("experts_after", len(groups))),
            kept_mass=kept, mass_basis=basis, group_sizes=tuple(len(g.get("members") or ()) for g in groups),
            heldout_error_before=refit.get("heldout_error_before"), heldout_error_after=refit.get("heldout_error_after"),
        ))
    return rows


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{folder} has no {MANIFEST_NAME}: give an output folder of ream-hf compress")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(rows: list[LayerLoss]) -> str:
    """The report as a plain-text table, one line per MoE layer, and a line on what the columns mean."""
    header = ("layer", "experts", "kept routing mass", "held-out error before refit", "after refit",
              "groups (size:count)")
    lines = [(row.layer, f"{row.experts_before} -> {row.experts_after}",
              f"{100 * row.kept_mass:.1f}%" + ("*" if row.mass_basis == "frequency" else ""),
              _error(row.heldout_error_before), _error(row.heldout_error_after),
              " ".join(f"{size}:{count}" for size, count in row.size_counts)) for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    text = ["  ".join(cell.ljust(width) if i in (0, 5) else cell.rjust(width)
                      for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()
            for cells in (header, *lines)]
    text.append("")
    text.append("kept routing mass: share of the calibration's routing weight on the experts each layer keeps (groups' "
                "centroids); held-out error: the layer output's relative error on held-out calibration sequences, "
                "before and after the down-projection refit ('-': no refit ran)")
    if any(row.mass_basis == "frequency" for row in rows):
        text.append("*: share of the top-k selections instead (the manifest has no routing weights for the layer)")
    return "\n".join(text)


def plot_layer_losses(rows: list[LayerLoss], path: str | os.PathLike, title: str = "") -> Path:
    """Draw the report into a PNG at `path` with matplotlib's Agg canvas: no display needed, and pyplot's global
    backend (a notebook's, say) is left alone."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    positions = list(range(len(rows)))
    labels = [str(row.index) for row in rows]
    figure = Figure(figsize=(min(16.0, max(7.0, 0.28 * len(rows) + 2.5)), 8.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    mass_axes, error_axes, group_axes = figure.subplots(3, 1, sharex=True)

    bars = mass_axes.bar(positions, [100 * row.kept_mass for row in rows], color="#4c72b0")
    if len(rows) <= 24:
        mass_axes.bar_label(bars, fmt="%.0f", fontsize=7)
    mass_axes.set_ylim(0, 100)
    mass_axes.set_ylabel("kept routing\nmass (%)")
    bases = " / ".join(sorted({row.mass_basis for row in rows}))
    mass_axes.set_title(f"calibration {bases} on the experts each layer keeps", fontsize=9, loc="left")

    refit = [row for row in rows if row.heldout_error_before is not None]
    if refit:
        width = 0.4
        xs = [positions[rows.index(row)] for row in refit]
        error_axes.bar([x - width / 2 for x in xs], [row.heldout_error_before for row in refit], width,
                       label="before refit", color="#dd8452")
        error_axes.bar([x + width / 2 for x in xs], [row.heldout_error_after for row in refit], width,
                       label="after refit", color="#55a868")
        error_axes.legend(fontsize=8, loc="upper left")
        error_axes.set_title("layer output's relative error on held-out calibration sequences", fontsize=9, loc="left")
    else:
        error_axes.text(0.5, 0.5, "no held-out error recorded (no down-projection refit ran)", ha="center", va="center",
                        transform=error_axes.transAxes, fontsize=9, color="#555555")
        error_axes.set_yticks([])
    error_axes.set_ylabel("held-out\nerror")

    sizes = sorted({size for row in rows for size in row.group_sizes})
    colors = matplotlib.colormaps["viridis"]
    bottom = [0] * len(rows)
    for n, size in enumerate(sizes):
        counts = [row.group_sizes.count(size) for row in rows]
        group_axes.bar(positions, counts, bottom=bottom, label=f"{size}", color=colors(n / max(1, len(sizes) - 1)))
        bottom = [b + c for b, c in zip(bottom, counts)]
    group_axes.set_ylabel("output\nexperts")
    group_axes.set_title("output experts by merge-group size (source experts per output expert)", fontsize=9,
                         loc="left")
    group_axes.legend(title="group size", fontsize=7, title_fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    group_axes.set_xlabel("MoE layer")
    step = max(1, len(rows) // 40)
    group_axes.set_xticks(positions[::step], labels[::step], fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    path = Path(path)
    # no "Software" entry: the file's bytes then depend on what is drawn, not on the matplotlib version string
    figure.savefig(path, format="png", metadata={"Software": None})
    return path


def plot_title(manifest: dict[str, Any]) -> str:
    return (f"{manifest.get('method')}: {manifest.get('experts_before')} -> {manifest.get('experts_after')} experts "
            "per MoE layer")


def write_layer_report(folder: str | os.PathLike, path: str | os.PathLike | None = None) -> Path | None:
    """Draw the report of an output folder from its manifest into `path` (default: `layer_report.png` in the
    folder); None (nothing written) if the manifest has no MoE layer."""
    manifest = read_manifest(folder)
    rows = layer_losses(manifest)
    if not rows:
        return None
    return plot_layer_losses(rows, Path(folder) / LAYER_PLOT_NAME if path is None else path, plot_title(manifest))
