"""Shared fixtures and helpers: small generated photos and photo folders, the tiny demo catalogue (generated once
per session), the real ../shared car-parts photos, throw-away Kedro projects and `kedro` subprocesses, a tiny
trained bundle (one per session), MLflow look-ups and versioned-file look-ups in a project."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
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


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    """Encode ``img`` as JPEG bytes (quality 90 unless given)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **{"quality": 90, **kwargs})
    return buf.getvalue()


def free_port() -> int:
    """A local TCP port nothing listens on now (bound on 127.0.0.1, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ the tiny demo catalogue
TINY_DEMO = {"seed": 3, "size": 64, "scale": 0.35}   # ~230 photos in 63 categories: a real `kedro run` in seconds


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> tuple[Path, dict]:
    """(root, summary) of the demo catalogue at TINY_DEMO, generated once per session. Read-only: copy it first
    to change it."""
    from partmatch.demo import generate_demo_catalogue

    root = tmp_path_factory.mktemp("demo") / "tiny catalogue"   # a space in the path, as users have
    return root, generate_demo_catalogue(root, **TINY_DEMO)


@pytest.fixture(scope="session")
def tiny_catalogue(tiny_demo) -> Path:
    """The folder of :func:`tiny_demo`."""
    return tiny_demo[0]


# ------------------------------------------------------------------------------------------ a tiny trained model
TINY_CLASSES = ["Alternator", "Brake Pad", "Fuel Cap", "Headlight", "Radio", "Spark Plug"]
TINY_OPEN = ["Wiper", "Horn"]


def tiny_set(per_class: int = 10, size: int = 16) -> tuple[np.ndarray, pd.DataFrame]:
    """Each category is a dark square at its own position on a white background, with noise (even raw pixels
    separate them). The first 6 photos of a category train, 2 validate, 2 test; TINY_OPEN are unseen."""
    rng = np.random.default_rng(0)
    images, rows = [], []
    for c, label in enumerate(TINY_CLASSES + TINY_OPEN):
        for i in range(per_class):
            img = np.full((size, size), 255, dtype=np.int16)
            r, col = divmod(c, 3)
            img[r * 5:r * 5 + 5, col * 5:col * 5 + 5] = 40
            img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
            images.append(img[None])
            split = "open" if label in TINY_OPEN else ("train" if i < 6 else "val" if i < 8 else "test")
            rows.append({"label": label, "split": split})
    return np.stack(images), pd.DataFrame(rows)


def training_params(**over) -> dict:
    """Model-pipeline parameters for :func:`tiny_set` (8-d triplet embedding, 2 epochs, CPU-quick)."""
    base = {"task": "embedding", "loss": "triplet", "sampling": "semihard", "margin": 0.2, "normalize": True,
            "embedding_dim": 8, "epochs": 2, "batch_size": 16, "m_per_class": 4, "lr": 0.005, "patience": None,
            "seed": 0, "progress": False, "threshold_pairs": 200, "eval_pairs": 100, "checkpoint_dir": None}
    return {**base, **over}


@pytest.fixture(scope="session")
def tiny_trained() -> dict:
    """``train_model`` run once per session on :func:`tiny_set` with :func:`training_params`: images, index,
    params, bundle (uncalibrated), history, summary and every image's embedding. Treat as read-only."""
    from partmatch.pipelines.training.nodes import embed_images, train_model

    images, index = tiny_set()
    p = training_params()
    bundle, history, summary = train_model(images, index, p, {"image_size": 16})
    return {"images": images, "index": index, "params": p, "bundle": bundle, "history": history,
            "summary": summary, "embeddings": embed_images(bundle, images, p)}


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


def kedro_cli(project: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """``kedro <args>`` in ``project`` as a user types it (its own src first on the path), a real subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(project / "src"), "KEDRO_DISABLE_TELEMETRY": "1",
                "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kedro", *args], cwd=project, env=full_env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def latest(project: Path, relpath: str) -> Path:
    """The newest version of the versioned dataset file ``data/<relpath>`` in ``project``, asserting it exists."""
    versions = sorted((project / "data" / relpath).glob("*/" + Path(relpath).name))
    assert versions, f"no version of {relpath} was written"
    return versions[-1]


def tracking_client(project: Path):
    """An MlflowClient on ``project``'s own SQLite tracking store."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def experiment_runs(project: Path, experiment: str = "partmatch") -> list:
    """Every run of ``experiment`` in ``project``'s tracking store (the experiment must exist)."""
    client = tracking_client(project)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment '{experiment}' was not created"
    return client.search_runs([exp.experiment_id])


@pytest.fixture
def kedro_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the project's configuration in a temp folder (own data/ and mlflow.db); returns a runner."""
    monkeypatch.chdir(tmp_path)
    run = new_kedro_project(tmp_path / "project")
    monkeypatch.chdir(run.path)
    return run
