"""Shared fixtures: small generated photo folders, the real ../shared car-parts photos, a throw-away Kedro project."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CARPARTS = (PROJECT_ROOT.parent / "shared" / "datasets" / "carparts").resolve()


def make_photo(kind: int, size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A small product-like photo: a dark shape of a kind-specific form on an off-white background."""
    rng = np.random.default_rng(seed)
    w, h = size
    bg = int(rng.integers(235, 256))
    img = Image.new("RGB", size, (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    cx, cy = w / 2 + rng.uniform(-3, 3), h / 2 + rng.uniform(-3, 3)
    r = min(w, h) * rng.uniform(0.25, 0.4)
    shade = int(30 + 40 * (kind % 4))
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind % 3 == 0:
        draw.ellipse(box, fill=(shade, shade, shade))
    elif kind % 3 == 1:
        draw.rectangle(box, fill=(shade, shade + 20, shade))
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=(shade + 10, shade, shade))
    return img.convert(mode) if mode != "RGB" else img


def save_jpeg(img: Image.Image, path: Path, **kwargs) -> Path:
    """Write ``img`` as JPEG, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90, **kwargs)
    return path


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """A tiny catalogue: 4 good categories (one with 1 photo), one excluded family, bad files of every kind."""
    root = tmp_path / "photos"
    plan = {"Brake Disc": 6, "Spark Plug": 5, "Alarm Siren": 4, "Lonely Part": 1, "Wheel Bearing": 3}
    for k, (label, n) in enumerate(plan.items()):
        for i in range(n):
            save_jpeg(make_photo(k, seed=100 * k + i), root / label / f"{i:03d}.jpg")
    good = (root / "Brake Disc" / "000.jpg").read_bytes()
    (root / "Spark Plug" / "dup_of_disc.jpg").write_bytes(good)            # cross-category duplicate
    (root / "Brake Disc" / "copy.jpg").write_bytes(good)                   # same-category duplicate
    (root / "Spark Plug" / "truncated.jpg").write_bytes((root / "Spark Plug" / "001.jpg").read_bytes()[:300])
    (root / "Spark Plug" / "notes.txt").write_text("not a photo")
    (root / "Alarm Siren" / "fake.jpg").write_text("this is text, not a jpeg")
    (root / "Alarm Siren" / "empty.png").write_bytes(b"")
    (root / "README.txt").write_text("files at the top level are not in a category")
    return root


def write_csv_manifest(root: Path, rows: list[tuple[str, str, str]], name: str = "manifest.csv") -> Path:
    """Write a Kaggle-style CSV (class index, filepaths, labels, data set) next to the photos."""
    import pandas as pd

    labels = sorted({r[1] for r in rows})
    df = pd.DataFrame([{"class index": labels.index(lab), "filepaths": p, "labels": lab, "data set": s}
                       for p, lab, s in rows])
    path = root / name
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def carparts() -> Path:
    """The real car-part photos beside the checkout (skip only where ../shared is absent)."""
    if not (CARPARTS / "car parts.csv").exists():
        pytest.skip(f"real photos not found at {CARPARTS}")
    return CARPARTS


def png_bytes(img: Image.Image, **kwargs) -> bytes:
    """Encode ``img`` as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def new_kedro_project(project: Path):
    """A copy of the project's configuration and code in ``project`` (own data/ and mlflow.db), bootstrapped;
    returns ``run(pipelines, **runtime_params)``, which runs a KedroSession there (cwd must be ``project``)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    project.mkdir(parents=True)
    for name in ("pyproject.toml", ".kedro.yml", ".telemetry"):
        shutil.copy(PROJECT_ROOT / name, project / name)
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    (project / "data").mkdir()
    # An absolute tracking URI per test project: MLflow caches its SQL store per URI string, so the relative
    # default (sqlite:///mlflow.db) would keep writing to the first test's database.
    (project / "conf" / "local" / "mlflow.yml").write_text(
        f"server:\n  mlflow_tracking_uri: sqlite:///{project / 'mlflow.db'}\n")
    shutil.copytree(PROJECT_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    bootstrap_project(project)

    def run(pipelines: list[str] | str | None = None, **runtime_params):
        names = [pipelines] if isinstance(pipelines, str) else pipelines
        import mlflow

        try:
            with KedroSession.create(project_path=project, runtime_params=runtime_params or None) as session:
                return session.run(pipeline_names=names)
        finally:
            # kedro-mlflow ends its run in after_pipeline_run, but under pytest the run stays on mlflow's
            # active-run stack; close it so the next session in this process opens its own run.
            while mlflow.active_run() is not None:
                mlflow.end_run()

    run.path = project
    return run


@pytest.fixture
def kedro_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the project's configuration in a temp folder (own data/ and mlflow.db); returns a runner."""
    monkeypatch.chdir(tmp_path)
    run = new_kedro_project(tmp_path / "project")
    monkeypatch.chdir(run.path)
    return run
