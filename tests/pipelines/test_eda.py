"""EDA nodes: tables and real figures."""

import numpy as np
import pandas as pd

from partmatch.pipelines.eda.nodes import category_counts, pca_top_categories, sample_grid, top_categories_chart


def fake_data(n_classes=8, size=16, seed=0):
    rng = np.random.default_rng(seed)
    counts = [20, 15, 10, 6, 5, 3, 2, 2][:n_classes]
    labels = [f"cat{i}" for i, n in enumerate(counts) for _ in range(n)]
    images = rng.integers(0, 256, size=(len(labels), 1, size, size), dtype=np.uint8)
    split = ["open" if lab == "cat1" else "train" for lab in labels]
    split[-1] = "excluded"
    index = pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(labels))], "label": labels, "split": split})
    return images, index


def test_category_table_top_bottom():
    images, index = fake_data()
    table, md = category_counts(index, {"table_rows": 3})
    assert list(table["category"][:3]) == ["cat0", "cat1", "cat2"]
    assert table["images"].sum() == len(index) - 1                   # the excluded photo is not counted
    assert table.loc[table["category"] == "cat1", "split"].item() == "open"
    assert "## Top 3" in md and "## Bottom 3" in md and "| 1 | cat0 | 20 |" in md


def test_figures_and_pca():
    images, index = fake_data()
    table, _ = category_counts(index, {})
    chart = top_categories_chart(table, {"top_n": 5})
    bars = chart.axes[0].patches
    # the five biggest categories, biggest at the top (barh draws bottom-up), each bar as long as its count
    assert [b.get_width() for b in bars] == [5, 6, 10, 15, 20]
    assert [t.get_text() for t in chart.axes[0].get_yticklabels()] == ["cat4", "cat3", "cat2", "cat1", "cat0"]
    summary, scree, cum, eig, metrics = pca_top_categories(images, index, {"top_n": 30, "pca_variance_target": 0.9,
                                                                          "n_eigen_images": 3})
    assert summary["images"] == len(index) - 1
    ratios = summary["explained_variance_ratio_first_30"]
    assert all(a >= b - 1e-12 for a, b in zip(ratios, ratios[1:]))   # descending spectrum
    # reference: sklearn's full PCA of the same pixels (the excluded photo left out), first cumulative >= 90 %
    from sklearn.decomposition import PCA

    used = images[(index["split"] != "excluded").to_numpy()].reshape(len(index) - 1, -1) / 255.0
    ref_cum = np.cumsum(PCA().fit(used).explained_variance_ratio_)
    assert summary["components"] == len(index) - 2                  # n - 1 components for n < pixels
    assert summary["components_for_target"] == int(np.argmax(ref_cum >= 0.9)) + 1
    assert len(eig.axes) == 4 and "PC1" in eig.axes[1].get_title()
    assert "reach 90%" in cum.axes[0].get_title()
    assert metrics["pca_components_for_target"]["value"] == summary["components_for_target"]
    grid = sample_grid(images, index, {"grid_categories": 4, "samples_per_category": 3})
    assert len(grid.axes) == 12 and grid.axes[0].get_ylabel() == "cat0"


def test_pca_spectrum_matches_sklearn():
    from sklearn.decomposition import PCA

    from partmatch.pipelines.eda.nodes import _explained_variance_ratio

    x = np.random.default_rng(3).normal(size=(40, 30)).astype(np.float32)
    np.testing.assert_allclose(_explained_variance_ratio(x)[:10], PCA(10).fit(x).explained_variance_ratio_,
                               rtol=1e-3)
