"""EDA nodes: the study's category table, top-N bar chart, PCA of the top categories and sample grids."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from partmatch import config
from partmatch.tracking import as_mlflow_metrics

logger = logging.getLogger(__name__)

_USED = ["train", "val", "test", "open"]


def category_counts(split_index: pd.DataFrame, params: dict[str, Any]) -> tuple[pd.DataFrame, str]:
    """Per-category image counts (full table) and the study's top/bottom table as markdown."""
    p = config.parse("eda", params)
    used = split_index[split_index["split"].isin(_USED)]
    table = (used.groupby("label").agg(images=("path", "size"),
                                       split=("split", lambda s: "open" if (s == "open").all() else "closed"))
             .reset_index().rename(columns={"label": "category"})
             .sort_values(["images", "category"], ascending=[False, True]).reset_index(drop=True))
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    n = p.table_rows
    head, tail = table.head(n), table.tail(n) if len(table) > n else table.iloc[0:0]
    md = ["# Images per category", "",
          f"{len(used)} images in {len(table)} categories (mean {table['images'].mean():.1f}, "
          f"median {table['images'].median():.0f}, min {table['images'].min()}, max {table['images'].max()}).", "",
          f"## Top {len(head)}", "", "| rank | category | images |", "|---:|---|---:|",
          *[f"| {r.rank} | {r.category} | {r.images} |" for r in head.itertuples()]]
    if len(tail):
        md += ["", f"## Bottom {len(tail)}", "", "| rank | category | images |", "|---:|---|---:|",
               *[f"| {r.rank} | {r.category} | {r.images} |" for r in tail.itertuples()]]
    return table, "\n".join(md) + "\n"


def top_categories_chart(counts: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """Horizontal bar chart of the top-N categories by image count."""
    p = config.parse("eda", params)
    top = counts.head(p.top_n).iloc[::-1]
    fig = Figure(figsize=(9, max(3.0, 0.28 * len(top) + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh(top["category"], top["images"], color="#4472c4")
    ax.bar_label(bars, padding=2, fontsize=8)
    ax.set_xlabel("images")
    ax.set_title(f"Top {len(top)} categories by number of images (of {len(counts)})")
    ax.tick_params(axis="y", labelsize=8)
    return fig


def _top_category_pixels(images: np.ndarray, split_index: pd.DataFrame, top_n: int) -> np.ndarray:
    used = split_index[split_index["split"].isin(_USED)]
    top = used["label"].value_counts().head(top_n).index
    rows = used.index[used["label"].isin(top)].to_numpy()
    return images[rows].reshape(len(rows), -1).astype(np.float32) / 255.0


def _explained_variance_ratio(x: np.ndarray) -> np.ndarray:
    """Full PCA spectrum (explained-variance ratios, descending) via the smaller Gram/covariance matrix."""
    xc = x - x.mean(axis=0, keepdims=True)
    gram = xc @ xc.T if xc.shape[0] <= xc.shape[1] else xc.T @ xc
    eig = np.clip(np.linalg.eigvalsh(gram.astype(np.float64))[::-1], 0, None)
    eig = eig[: min(xc.shape[0] - 1, xc.shape[1])]
    return eig / eig.sum()


def pca_top_categories(images: np.ndarray, split_index: pd.DataFrame,
                       params: dict[str, Any]) -> tuple[dict, Figure, Figure, Figure, dict]:
    """PCA on the top-N categories: summary, scree plot, cumulative variance curve, first eigen-images."""
    p = config.parse("eda", params)
    x = _top_category_pixels(images, split_index, p.top_n)
    if x.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 images in the top {p.top_n} categories, found {x.shape[0]}.")
    ratio = _explained_variance_ratio(x)
    n_comp = len(ratio)
    cum = np.cumsum(ratio)
    n_target = int(np.searchsorted(cum, p.pca_variance_target - 1e-12) + 1)
    n_ref = min(p.pca_max_components, n_comp)
    pca = PCA(n_components=min(p.n_eigen_images, n_comp), svd_solver="randomized", random_state=p.seed).fit(x)
    summary = {"images": int(x.shape[0]), "pixels": int(x.shape[1]), "components": n_comp,
               "variance_target": p.pca_variance_target, "components_for_target": n_target,
               "reference_components": n_ref, "variance_explained_by_reference_components": float(cum[n_ref - 1]),
               "explained_variance_ratio_first_30": [float(v) for v in ratio[:30]]}
    logger.info("PCA on %d images of the top %d categories: %d components reach %.0f%%; %d components explain "
                "%.2f%%.", x.shape[0], p.top_n, n_target, 100 * p.pca_variance_target, n_ref, 100 * cum[n_ref - 1])

    k = min(p.scree_components, n_comp)
    scree = Figure(figsize=(8, 4.5), layout="constrained")
    ax = scree.add_subplot()
    ax.bar(np.arange(1, k + 1), 100 * ratio[:k], color="#4472c4", label="per component")
    ax.plot(np.arange(1, k + 1), 100 * cum[:k], "o-", color="#c00000", ms=3, label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance (%)")
    ax.set_title(f"Scree plot, first {k} components (top {p.top_n} categories, {x.shape[0]} images)")
    ax.legend()

    cumfig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = cumfig.add_subplot()
    ax.plot(np.arange(1, n_comp + 1), 100 * cum, color="#4472c4")
    ax.axhline(100 * p.pca_variance_target, color="grey", ls="--", lw=1)
    ax.axvline(n_target, color="#c00000", ls="--", lw=1)
    ax.annotate(f"{n_target} components: {100 * cum[n_target - 1]:.2f}%", (n_target, 100 * cum[n_target - 1]),
                xytext=(15, -35), textcoords="offset points", color="#c00000",
                arrowprops={"arrowstyle": "->", "color": "#c00000"})
    ax.plot([n_ref], [100 * cum[n_ref - 1]], "s", color="#404040", ms=5,
            label=f"{n_ref} components: {100 * cum[n_ref - 1]:.2f}%")
    ax.legend(loc="lower right")
    ax.set_xlabel("number of components")
    ax.set_ylabel("cumulative explained variance (%)")
    ax.set_ylim(0, 101)
    ax.set_title(f"Cumulative explained variance: {n_target} components reach {100 * p.pca_variance_target:.0f}%")

    channels, size = images.shape[1], images.shape[2]
    n_eig = min(p.n_eigen_images, n_comp)
    eig = Figure(figsize=(2.2 * (n_eig + 1), 2.6), layout="constrained")
    axes = eig.subplots(1, n_eig + 1)
    mean = pca.mean_.reshape(channels, size, size).transpose(1, 2, 0)
    axes[0].imshow(mean.squeeze(), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("mean image", fontsize=9)
    for i in range(n_eig):
        comp = pca.components_[i].reshape(channels, size, size).mean(axis=0)
        lim = float(np.abs(comp).max()) or 1.0
        axes[i + 1].imshow(comp, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[i + 1].set_title(f"PC{i + 1} ({100 * ratio[i]:.1f}%)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    eig.suptitle("Mean image and first eigen-images")
    metrics = as_mlflow_metrics({"pca_components_for_target": n_target,
                                 "pca_variance_reference_components": float(cum[n_ref - 1])})
    return summary, scree, cumfig, eig, metrics


def sample_grid(images: np.ndarray, split_index: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """Grid of preprocessed sample photos: one row per category (largest first), seeded choice of photos."""
    p = config.parse("eda", params)
    used = split_index[split_index["split"].isin(_USED)]
    cats = used["label"].value_counts().head(p.grid_categories).index
    cols = p.samples_per_category
    fig = Figure(figsize=(1.3 * cols + 2.2, 1.3 * len(cats) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(cats), cols, squeeze=False))
    rng = np.random.default_rng(p.seed)
    for r, cat in enumerate(cats):
        rows = used.index[used["label"] == cat].to_numpy()
        pick = rng.choice(rows, size=min(cols, len(rows)), replace=False)
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(pick):
                img = images[pick[c]]
                ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
        axes[r, 0].set_ylabel(str(cat)[:22], rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Preprocessed samples ({images.shape[2]}x{images.shape[3]}, {len(cats)} largest categories)")
    return fig
