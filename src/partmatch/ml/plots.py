"""Evaluation figures: pair-distance histograms, threshold / ROC curves, training curves, model comparison.

Every function builds a stand-alone :class:`matplotlib.figure.Figure` (no pyplot state, so nothing has to
be closed and any backend, Agg included, works) and returns it; save it with ``fig.savefig(path)`` or hand
it to Kedro's ``MatplotlibWriter``. Nothing is shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

POSITIVE_COLOR = "tab:green"
NEGATIVE_COLOR = "tab:red"
THRESHOLD_COLOR = "black"
DISTANCE_LABEL = "Euclidean distance between embeddings (embedding-space units)"
COSINE_DISTANCE_LABEL = "Distance between L2-normalised embeddings, sqrt(2 - 2 cos) (0 to 2)"


def _pairs(distances, same) -> tuple[np.ndarray, np.ndarray]:
    from partmatch.ml.evaluation import _check_pairs  # one validation for metrics and figures

    return _check_pairs(distances, same)


def pair_distance_histogram(
    distances: np.ndarray, same: np.ndarray, threshold: float | None = None, *, distance_label: str = DISTANCE_LABEL
) -> Figure:
    """Overlaid histograms of same-part (positive) and different-part (negative) pair distances, with the
    decision threshold (and the accuracy it gives on these pairs) as a vertical line. ``distance_label`` is
    the x-axis label (e.g. :data:`COSINE_DISTANCE_LABEL`)."""
    d, s = _pairs(distances, same)
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    finite = d[np.isfinite(d)]
    edges = np.histogram_bin_edges(finite, bins=min(60, max(10, int(np.sqrt(len(finite))))))
    for mask, color, name in ((s, POSITIVE_COLOR, "same part"), (~s, NEGATIVE_COLOR, "different parts")):
        vals = d[mask]
        ax.hist(vals, bins=edges, alpha=0.55, color=color, edgecolor="white", linewidth=0.4,
                label=f"{name} (n={len(vals)})")
        if len(vals):
            ax.axvline(float(np.median(vals)), color=color, linestyle=":", linewidth=1.2)
    if threshold is not None:
        acc = float(np.mean((d <= threshold) == s))
        ax.axvline(float(threshold), color=THRESHOLD_COLOR, linestyle="--", linewidth=1.8,
                   label=f"threshold = {threshold:.3f} (accuracy {acc:.1%})")
    ax.set_xlabel(distance_label)
    ax.set_ylabel("Number of pairs")
    ax.set_title("Pair distances: same part vs different parts (dotted: medians)")
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig


def threshold_curves(
    curve_df: pd.DataFrame, chosen_threshold: float, *, distance_label: str = DISTANCE_LABEL
) -> Figure:
    """Accuracy, precision, recall and F1 of the "same part" decision against the distance threshold
    (``curve_df`` as returned by :func:`partmatch.ml.evaluation.choose_threshold`)."""
    needed = ["threshold", "accuracy", "precision", "recall", "f1"]
    missing = [c for c in needed if c not in curve_df.columns]
    if missing:
        raise ValueError(f"curve_df lacks column(s) {missing}")
    if len(curve_df) == 0:
        raise ValueError("curve_df is empty")
    df = curve_df.sort_values("threshold")
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    styles = {"accuracy": ("tab:blue", "-", 2.2), "precision": ("tab:orange", "-", 1.4),
              "recall": ("tab:green", "-", 1.4), "f1": ("tab:purple", "--", 1.4)}
    for col, (color, ls, lw) in styles.items():
        ax.plot(df["threshold"], df[col], color=color, linestyle=ls, linewidth=lw,
                label="F1" if col == "f1" else col.capitalize())
    t = float(chosen_threshold)
    idx = int(np.searchsorted(df["threshold"].to_numpy(), t, side="right")) - 1
    acc = float(df["accuracy"].iloc[max(idx, 0)])
    ax.axvline(t, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.5,
               label=f"chosen threshold = {t:.3f} (accuracy {acc:.1%})")
    ax.plot([t], [acc], marker="o", color=THRESHOLD_COLOR, markersize=6)
    ax.set_xlabel(f"Distance threshold: {distance_label}\n(pair predicted 'same part' if distance <= threshold)")
    ax.set_ylabel("Score (fraction)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("Verification metrics vs distance threshold")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def _best_epoch(epochs: np.ndarray, scores: np.ndarray) -> int | None:
    finite = np.isfinite(scores)
    if not finite.any():
        return None
    masked = np.where(finite, scores, -np.inf)
    return int(epochs[int(np.argmax(masked))])  # first maximum, as the training engine keeps it


def loss_curves(
    history: Sequence[dict],
    *,
    best_epoch: int | None = None,
    loss_key: str = "train_loss",
    score_key: str = "val_score",
    score_label: str = "Validation score",
) -> Figure:
    """Training loss and validation score per epoch (two panels sharing the epoch axis), best epoch marked.

    ``history`` is the engine's list of per-epoch records (``epoch``, ``train_loss``, ``val_score``, ...).
    The best epoch is the first one with the highest finite validation score unless ``best_epoch`` is given.
    """
    if not history:
        raise ValueError("history is empty")
    epochs = np.array([h.get("epoch", i + 1) for i, h in enumerate(history)], dtype=np.int64)
    loss = np.array([h.get(loss_key, np.nan) for h in history], dtype=np.float64)
    score = np.array([h.get(score_key, np.nan) for h in history], dtype=np.float64)
    if best_epoch is None:
        best_epoch = _best_epoch(epochs, score)

    fig = Figure(figsize=(8, 6), layout="constrained")
    ax_loss, ax_score = fig.subplots(2, 1, sharex=True)
    ax_loss.plot(epochs, loss, marker="o", color="tab:blue", label="train loss")
    ax_loss.set_ylabel("Training loss (mean per batch)")
    ax_loss.set_title("Training loss per epoch")
    ax_score.plot(epochs, score, marker="o", color="tab:orange", label=score_label.lower())
    ax_score.set_ylabel(score_label)
    ax_score.set_xlabel("Epoch")
    ax_score.set_title(f"{score_label} per epoch")
    if best_epoch is not None:
        for ax in (ax_loss, ax_score):
            ax.axvline(best_epoch, color="tab:green", linestyle="--", linewidth=1.3,
                       label=f"best epoch = {best_epoch}")
        hit = np.flatnonzero(epochs == best_epoch)
        if len(hit) and np.isfinite(score[hit[0]]):
            ax_score.plot([best_epoch], [score[hit[0]]], marker="*", markersize=14, color="tab:green",
                          linestyle="none", label=f"best {score_label.lower()} = {score[hit[0]]:.4f}")
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    ax_score.xaxis.get_major_locator().set_params(integer=True)
    return fig


def roc_curve_figure(distances: np.ndarray, same: np.ndarray, threshold: float | None = None) -> Figure:
    """ROC curve of the "same part" decision as the distance threshold sweeps (score = -distance), with
    the AUC in the legend and, if ``threshold`` is given, its operating point."""
    d, s = _pairs(distances, same)
    if s.all() or not s.any():
        raise ValueError("ROC needs both same-part and different-part pairs")
    fpr, tpr, _ = roc_curve(s, -d)
    auc = roc_auc_score(s, -d)
    fig = Figure(figsize=(5.8, 5.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"ROC (AUC = {auc:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance (AUC = 0.5)")
    if threshold is not None:
        pred = d <= threshold
        op_tpr = float(pred[s].mean())
        op_fpr = float(pred[~s].mean())
        ax.plot([op_fpr], [op_tpr], marker="o", color=THRESHOLD_COLOR, linestyle="none",
                label=f"threshold {threshold:.3f}: TPR {op_tpr:.2f}, FPR {op_fpr:.2f}")
    ax.set_xlabel("False positive rate (different parts called same)")
    ax.set_ylabel("True positive rate (same part recognised)")
    ax.set_title(f"Pair verification ROC ({int(s.sum())} same / {int((~s).sum())} different pairs)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def comparison_bar_chart(table: pd.DataFrame, metrics: list[str], title: str = "Model comparison") -> Figure:
    """Grouped bars: one group per metric, one bar per model (``table`` index = model name, one column per
    metric), each bar annotated with its value (NaN drawn as an empty bar marked "n/a")."""
    if len(table) == 0:
        raise ValueError("table is empty")
    if not metrics:
        raise ValueError("metrics is empty")
    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise ValueError(f"table lacks metric column(s) {missing}")
    values = table[list(metrics)].astype(float)
    n_models, n_metrics = len(values), len(metrics)
    width = 0.8 / n_models
    x = np.arange(n_metrics)
    fig = Figure(figsize=(max(6.0, 1.2 + n_metrics * (0.45 + 0.35 * n_models)), 5.2), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(n_models)]
    for i, (model, row) in enumerate(values.iterrows()):
        vals = row.to_numpy(dtype=np.float64)
        heights = np.nan_to_num(vals, nan=0.0)
        bars = ax.bar(x - 0.4 + width * (i + 0.5), heights, width * 0.95, label=str(model), color=colors[i])
        labels = ["n/a" if math.isnan(v) else f"{v:.3f}" for v in vals]
        ax.bar_label(bars, labels=labels, padding=2, fontsize=7 if n_models > 3 else 8,
                     rotation=90 if n_models > 3 else 0)
    finite = values.to_numpy()[np.isfinite(values.to_numpy())]
    if len(finite) and finite.min() >= 0 and finite.max() <= 1:
        ax.set_ylim(0, 1.18)
        ax.set_ylabel("Score (fraction, higher is better)")
    else:
        ax.set_ylabel("Metric value")
        ax.margins(y=0.15)
    tilt = n_metrics > 4
    ax.set_xticks(x, [str(m) for m in metrics], rotation=20 if tilt else 0, ha="right" if tilt else "center")
    ax.set_xlabel("Metric")
    ax.set_title(title)
    ax.legend(title="Model", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.axhline(0, color="black", linewidth=0.6)
    return fig


def rejection_curve_figure(
    curve: pd.DataFrame,
    threshold: float | None = None,
    summary: dict | None = None,
    *,
    distance_label: str = DISTANCE_LABEL,
) -> Figure:
    """Open-set rejection (``curve`` and ``summary`` from :func:`partmatch.ml.evaluation.open_set_rejection`).

    Left: against the nearest-distance threshold, the false match rate (unknown parts given a known name),
    the false non-match rate (known parts rejected) and the share of known parts correctly named, with the
    calibrated ``threshold`` marked. Right: FNMR against FMR (log x axis, the trade-off a threshold picks),
    with FMR = 1 % and the calibrated operating point marked.
    """
    needed = ["threshold", "fmr", "fnmr", "known_identified"]
    missing = [c for c in needed if c not in curve.columns]
    if missing:
        raise ValueError(f"curve lacks column(s) {missing}; pass the curve from evaluation.open_set_rejection")
    if len(curve) == 0:
        raise ValueError("curve is empty")
    df = curve.sort_values("threshold")
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax, ax_det = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    ax.plot(df["threshold"], df["fmr"], color=NEGATIVE_COLOR, linewidth=2.0,
            label="FMR: unknown parts given a known name")
    ax.plot(df["threshold"], df["fnmr"], color="tab:blue", linewidth=2.0, label="FNMR: known parts rejected")
    ax.plot(df["threshold"], df["known_identified"], color=POSITIVE_COLOR, linewidth=1.4, linestyle="--",
            label="known parts correctly named")
    if threshold is not None and math.isfinite(float(threshold)):
        t = float(threshold)
        idx = max(int(np.searchsorted(df["threshold"].to_numpy(), t, side="right")) - 1, 0)
        fmr, fnmr = float(df["fmr"].iloc[idx]), float(df["fnmr"].iloc[idx])
        ax.axvline(t, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.5,
                   label=f"model's unknown-part threshold = {t:.3f} (FMR {fmr:.1%}, FNMR {fnmr:.1%})")
        ax_det.plot([max(fmr, 1e-4)], [fnmr], marker="o", color=THRESHOLD_COLOR, markersize=7, linestyle="none",
                    label=f"unknown-part threshold (FMR {fmr:.1%}, FNMR {fnmr:.1%})")
    ax.set_xlabel(f"Threshold on the nearest catalogue distance\n({distance_label};\n"
                  "a query is answered 'unknown part' when its nearest distance > threshold)")
    ax.set_ylabel("Share of queries")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("Open-set rejection vs threshold")
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)

    fmr_axis = np.maximum(df["fmr"].to_numpy(dtype=float), 1e-4)  # log axis: FMR 0 drawn at 0.01 %
    ax_det.step(fmr_axis, df["fnmr"], where="post", color="tab:purple", linewidth=1.8)
    ax_det.axvline(0.01, color="grey", linestyle=":", linewidth=1.2, label="FMR = 1 %")
    if summary is not None and "fnmr_at_fmr_1pct" in summary:
        ax_det.axhline(float(summary["fnmr_at_fmr_1pct"]), color="grey", linestyle="--", linewidth=1.0,
                       label=f"FNMR@FMR=1 % = {float(summary['fnmr_at_fmr_1pct']):.1%}")
    ax_det.set_xscale("log")
    ax_det.set_xlim(1e-4 * 0.8, 1.05)
    ax_det.set_ylim(-0.02, 1.05)
    ax_det.set_xlabel("FMR (unknown parts accepted), log scale")
    ax_det.set_ylabel("FNMR (known parts rejected)")
    ax_det.set_title("Trade-off: FNMR vs FMR")
    ax_det.legend(loc="upper right", fontsize=8)
    ax_det.grid(alpha=0.3, which="both")
    return fig


# ================================================================== interpretability (partmatch.ml.interpret)

MAP_SIZE = (9.0, 7.0)
BAR_WIDTH = 9.0
GALLERY_CELL = 1.3  # inches per thumbnail


def _no_data(fig: Figure, message: str) -> Figure:
    ax = fig.subplots()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, wrap=True)
    ax.set_axis_off()
    return fig


def embedding_map_figure(xy: np.ndarray, labels: Sequence, title: str = "Open-set embeddings",
                         method: str = "t-SNE") -> Figure:
    """Scatter of a 2-D map of embeddings (:func:`partmatch.ml.interpret.project_2d`), one colour per category
    (legend up to 20 categories). Always :data:`MAP_SIZE` inches."""
    fig = Figure(figsize=MAP_SIZE, layout="constrained")
    xy, labels = np.asarray(xy, dtype=float), np.asarray(labels).astype(str)
    if len(xy) != len(labels):
        raise ValueError(f"{len(xy)} points but {len(labels)} labels")
    if len(xy) == 0:
        return _no_data(fig, "No embeddings to map (the split has no photos).")
    ax = fig.subplots()
    names = np.unique(labels)
    cmap = "tab20" if len(names) <= 20 else "nipy_spectral"
    from matplotlib import colormaps

    colours = colormaps[cmap](np.linspace(0, 1, max(len(names), 2), endpoint=len(names) > 20))
    for i, name in enumerate(names):
        pts = xy[labels == name]
        ax.scatter(pts[:, 0], pts[:, 1], s=12, alpha=0.8, color=colours[i % len(colours)],
                   label=f"{name} ({len(pts)})")
    if len(names) <= 20:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, title="category (photos)")
    ax.set_title(f"{title}: {method} map, {len(xy)} photos, {len(names)} categories")
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    return fig


def neighbour_gallery_figure(images: np.ndarray, query_rows: np.ndarray, neighbour_rows: np.ndarray,
                             labels: Sequence, title: str = "Open-set queries and their nearest photos") -> Figure:
    """One row per query: the query photo, then its nearest photos (``neighbour_rows``, nearest first) framed
    green when of the query's category and red otherwise, each captioned with its category. The figure is
    ``GALLERY_CELL`` inches per thumbnail: ``(1 + k) x GALLERY_CELL`` wide, ``rows x (GALLERY_CELL + 0.3)`` high."""
    query_rows, neighbour_rows = np.asarray(query_rows, dtype=np.int64), np.asarray(neighbour_rows, dtype=np.int64)
    labels = np.asarray(labels).astype(str)
    n, k = (len(query_rows), neighbour_rows.shape[1]) if neighbour_rows.ndim == 2 else (0, 5)
    fig = Figure(figsize=((1 + k) * GALLERY_CELL, max(n, 1) * (GALLERY_CELL + 0.3) + 0.4), layout="constrained")
    if n == 0:
        return _no_data(fig, "No query to show (no category with two photos).")
    axes = np.asarray(fig.subplots(n, 1 + k, squeeze=False))
    for i, q in enumerate(query_rows):
        for j, row in enumerate([q, *neighbour_rows[i]]):
            ax = axes[i, j]
            img = np.asarray(images[row])
            ax.imshow(img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            name = labels[row]
            if j == 0:
                colour, caption = "tab:blue", f"query: {name}"
            else:
                colour = POSITIVE_COLOR if name == labels[q] else NEGATIVE_COLOR
                caption = f"{j}. {name}"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3 if j else 2)
            ax.set_title(caption[:22], fontsize=6, color=colour)
    fig.suptitle(f"{title} (green: same category, red: another)", fontsize=9)
    return fig


def _bar_height(rows: int) -> float:
    return 1.2 + 0.3 * max(rows, 1)


def confused_pairs_figure(table: pd.DataFrame, title: str = "Most confused open-set categories") -> Figure:
    """Horizontal bars of :func:`partmatch.ml.interpret.confused_pairs`: "query -> retrieved" with the number of
    the query category's photos whose nearest photo is of the retrieved one (and the share). ``BAR_WIDTH``
    inches wide, ``1.2 + 0.3`` inches per pair high."""
    fig = Figure(figsize=(BAR_WIDTH, _bar_height(len(table))), layout="constrained")
    if len(table) == 0:
        return _no_data(fig, "No confusion: every query's nearest photo is of its own category.")
    ax = fig.subplots()
    names = [f"{a} -> {b}" for a, b in zip(table["query_category"], table["retrieved_category"], strict=True)]
    y = np.arange(len(table))[::-1]
    bars = ax.barh(y, table["count"].to_numpy(), color=NEGATIVE_COLOR, alpha=0.8)
    ax.bar_label(bars, labels=[f"{c} ({s:.0%})" for c, s in zip(table["count"], table["share"], strict=True)],
                 padding=2, fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("queries whose nearest photo is of the other category (share of the query category)")
    ax.set_title(title)
    ax.margins(x=0.15)
    return fig


def per_category_precision_figure(table: pd.DataFrame, title: str = "Open-set precision@1 per category") -> Figure:
    """Horizontal bars of :func:`partmatch.ml.interpret.per_category_precision` (worst at the top), each with
    its number of queries. ``BAR_WIDTH`` inches wide, ``1.2 + 0.3`` inches per category high."""
    fig = Figure(figsize=(BAR_WIDTH, _bar_height(len(table))), layout="constrained")
    if len(table) == 0:
        return _no_data(fig, "No category with two photos to retrieve.")
    ax = fig.subplots()
    y = np.arange(len(table))[::-1]
    values = table["precision_at_1"].to_numpy(dtype=float)
    bars = ax.barh(y, values, color=[POSITIVE_COLOR if v >= 0.5 else NEGATIVE_COLOR for v in values], alpha=0.8)
    ax.bar_label(bars, labels=[f"{v:.2f} (n={q})" for v, q in zip(values, table["queries"], strict=True)],
                 padding=2, fontsize=8)
    ax.set_yticks(y, table["category"].astype(str).tolist(), fontsize=8)
    ax.set_xlim(0, 1.2)
    ax.set_xlabel("precision@1 (leave-one-out: share of the category's photos whose nearest photo is of it)")
    ax.set_title(title)
    return fig
