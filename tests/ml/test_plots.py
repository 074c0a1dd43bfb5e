"""Tests of partmatch.ml.plots: real figures with the expected elements, saved as PNG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from partmatch.ml import evaluation as E
from partmatch.ml import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    same = np.arange(400) % 2 == 0
    d = np.where(same, rng.normal(1.0, 0.3, 400), rng.normal(2.0, 0.4, 400)).clip(0)
    thr, curve = E.choose_threshold(d, same)
    return d, same, thr, curve


def saved_png(fig: Figure, path) -> bytes:
    fig.savefig(path, dpi=60)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(path) as img:   # a whole, decodable picture of the figure's size at 60 dpi
        img.load()
        w, h = fig.get_size_inches()
        assert img.size == (round(w * 60), round(h * 60))
        assert len(img.getcolors(1 << 16) or range(1 << 16)) > 2   # drawn on, not a blank canvas
    return data


def vertical_lines_at(ax, x: float) -> list[Line2D]:
    """axvline-style lines (two points, same x, different y) at ``x``."""
    out = []
    for ln in ax.get_lines():
        xs, ys = np.asarray(ln.get_xdata(), dtype=float), np.asarray(ln.get_ydata(), dtype=float)
        if len(xs) == 2 and xs[0] == xs[1] and ys[0] != ys[1] and np.isclose(xs[0], x):
            out.append(ln)
    return out


def legend_texts(ax) -> list[str]:
    leg = ax.get_legend()
    assert leg is not None
    return [t.get_text() for t in leg.get_texts()]


def test_pair_distance_histogram(pairs, tmp_path):
    d, same, thr, _ = pairs
    fig = P.pair_distance_histogram(d, same, thr)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_title() and "distance" in ax.get_xlabel().lower() and ax.get_ylabel()
    assert len(vertical_lines_at(ax, thr)) == 1
    texts = legend_texts(ax)
    assert any(f"{thr:.3f}" in t for t in texts)
    assert any("same part (n=200)" in t for t in texts) and any("different parts (n=200)" in t for t in texts)
    assert len(ax.containers) == 2  # the two histograms
    assert sum(p.get_height() for p in ax.containers[0]) == 200
    saved_png(fig, tmp_path / "hist.png")
    cos = P.pair_distance_histogram(d, same, thr, distance_label=P.COSINE_DISTANCE_LABEL).axes[0]
    assert cos.get_xlabel() == P.COSINE_DISTANCE_LABEL
    # without a threshold there is no threshold line
    ax2 = P.pair_distance_histogram(d, same).axes[0]
    assert not any("threshold" in t for t in legend_texts(ax2))


def test_threshold_curves(pairs, tmp_path):
    d, same, thr, curve = pairs
    fig = P.threshold_curves(curve, thr)
    (ax,) = fig.axes
    labels = [ln.get_label() for ln in ax.get_lines()]
    for name in ("Accuracy", "Precision", "Recall", "F1"):
        assert name in labels
    assert len(vertical_lines_at(ax, thr)) == 1
    assert any(f"{thr:.3f}" in t for t in legend_texts(ax))
    acc_line = next(ln for ln in ax.get_lines() if ln.get_label() == "Accuracy")
    assert len(acc_line.get_xdata()) == len(curve)
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    saved_png(fig, tmp_path / "threshold.png")
    with pytest.raises(ValueError, match="f1"):
        P.threshold_curves(curve.drop(columns="f1"), thr)


def test_loss_curves_marks_the_best_epoch(tmp_path):
    scores = [0.5, 0.7, 0.9, 0.85, 0.9, float("nan")]
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_score": s} for e, s in enumerate(scores, start=1)]
    fig = P.loss_curves(history)
    assert len(fig.axes) == 2
    ax_loss, ax_score = fig.axes
    assert "loss" in ax_loss.get_ylabel().lower() and ax_score.get_xlabel() == "Epoch"
    for ax in fig.axes:
        assert len(vertical_lines_at(ax, 3)) == 1  # first maximum (epoch 3, not the tied epoch 5)
        assert any("best epoch = 3" in t for t in legend_texts(ax))
    loss_line = ax_loss.get_lines()[0]
    np.testing.assert_allclose(loss_line.get_ydata(), [2.0 / e for e in range(1, 7)])
    saved_png(fig, tmp_path / "loss.png")
    fig = P.loss_curves(history, best_epoch=5)
    assert len(vertical_lines_at(fig.axes[1], 5)) == 1
    with pytest.raises(ValueError, match="history"):
        P.loss_curves([])


def test_roc_curve_figure(pairs, tmp_path):
    d, same, thr, _ = pairs
    fig = P.roc_curve_figure(d, same)
    (ax,) = fig.axes
    auc = E.pair_metrics(d, same, thr)["roc_auc"]
    texts = legend_texts(ax)
    assert any(f"AUC = {auc:.4f}" in t for t in texts)
    assert len(ax.get_lines()) == 2  # ROC + chance diagonal
    roc = ax.get_lines()[0]
    assert roc.get_xdata()[0] == 0 and roc.get_ydata()[-1] == 1
    assert "false positive" in ax.get_xlabel().lower() and "true positive" in ax.get_ylabel().lower()
    saved_png(fig, tmp_path / "roc.png")
    assert len(P.roc_curve_figure(d, same, threshold=thr).axes[0].get_lines()) == 3  # + operating point
    with pytest.raises(ValueError, match="both"):
        P.roc_curve_figure(d[same], same[same])


def test_comparison_bar_chart(tmp_path):
    table = pd.DataFrame(
        {"precision_at_1": [0.81, 0.9, 0.62], "map_at_r": [0.5, 0.66, np.nan], "pair_accuracy": [0.88, 0.91, 0.8]},
        index=["siamese", "triplet", "arcface"],
    )
    metrics = ["precision_at_1", "map_at_r", "pair_accuracy"]
    fig = P.comparison_bar_chart(table, metrics)
    (ax,) = fig.axes
    assert len(ax.containers) == 3  # one bar series per model
    assert all(len(c) == 3 for c in ax.containers)  # one bar per metric
    assert legend_texts(ax) == ["siamese", "triplet", "arcface"]
    assert [t.get_text() for t in ax.get_xticklabels()] == metrics
    annotations = [t.get_text() for t in ax.texts]
    assert len(annotations) == 9 and "0.910" in annotations and "n/a" in annotations
    heights = [p.get_height() for p in ax.containers[1]]
    np.testing.assert_allclose(heights, [0.9, 0.66, 0.91])
    saved_png(fig, tmp_path / "compare.png")
    with pytest.raises(ValueError, match="recall_at_1"):
        P.comparison_bar_chart(table, ["recall_at_1"])


# ------------------------------------------------------------------------------------------ interpretability


def png_size(fig: Figure, path, dpi: int = 50) -> tuple[int, int]:
    from PIL import Image

    fig.savefig(path, dpi=dpi)
    with Image.open(path) as img:
        img.load()  # decodes the whole image
        return img.size


def test_embedding_map_colours_each_category_and_decodes_at_its_size(tmp_path):
    xy = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4.0]])
    fig = P.embedding_map_figure(xy, ["b", "a", "b", "c", "a"], method="PCA")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (2)", "b (2)", "c (1)"]
    assert [len(c.get_offsets()) for c in ax.collections] == [2, 2, 1]
    assert png_size(fig, tmp_path / "map.png") == (round(P.MAP_SIZE[0] * 50), round(P.MAP_SIZE[1] * 50))


def test_neighbour_gallery_marks_correct_neighbours_green(tmp_path):
    images = np.arange(6 * 8 * 8, dtype=np.uint8).reshape(6, 1, 8, 8)
    labels = np.array(["A", "A", "B", "B", "A", "B"])
    fig = P.neighbour_gallery_figure(images, np.array([0, 2]), np.array([[1, 2, 4], [5, 0, 3]]), labels)
    axes = fig.axes
    assert len(axes) == 2 * 4
    colours = [matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor()) for ax in axes]
    green, red, blue = (matplotlib.colors.to_hex(c) for c in (P.POSITIVE_COLOR, P.NEGATIVE_COLOR, "tab:blue"))
    assert colours == [blue, green, red, green, blue, green, red, green]
    assert png_size(fig, tmp_path / "gallery.png") == (round(4 * P.GALLERY_CELL * 50), round((2 * (P.GALLERY_CELL + 0.3) + 0.4) * 50))


def test_confusion_and_per_category_bars_show_the_tables(tmp_path):
    confused = pd.DataFrame({"query_category": ["A", "C"], "retrieved_category": ["B", "B"], "count": [4, 1],
                             "share": [0.8, 0.25]})
    fig = P.confused_pairs_figure(confused)
    ax = fig.axes[0]
    top_down = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    assert [t.get_text() for t in top_down] == ["A -> B", "C -> B"]  # top bar = most confused
    assert [round(p.get_width()) for p in ax.patches] == [4, 1]
    assert png_size(fig, tmp_path / "confused.png") == (round(P.BAR_WIDTH * 50), round((1.2 + 0.3 * 2) * 50))
    table = pd.DataFrame({"category": ["A", "B", "C"], "queries": [5, 4, 2], "precision_at_1": [0.2, 0.5, 1.0]})
    fig = P.per_category_precision_figure(table)
    assert [p.get_width() for p in fig.axes[0].patches] == [0.2, 0.5, 1.0]
    assert png_size(fig, tmp_path / "per_category.png") == (round(P.BAR_WIDTH * 50), round((1.2 + 0.3 * 3) * 50))
    assert png_size(P.confused_pairs_figure(confused.iloc[:0]), tmp_path / "none.png") == (round(P.BAR_WIDTH * 50), 75)
