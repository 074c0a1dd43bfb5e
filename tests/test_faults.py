"""Faults (issue 11): saves cut short, full disks and read-only folders, a training run killed with SIGKILL and
resumed, a killed ``kedro run`` left RUNNING in MLflow, a resume with another architecture.

Run as root a ``chmod`` does not stop writes, so the read-only and full-disk cases raise the errno the kernel would
(``EROFS``, ``EACCES``, ``ENOSPC``) from fsspec's local file at the moment it writes; a real ``chmod`` test runs
too where the tests do not run as root.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fsspec.implementations.local import LocalFileOpener
from kedro.io.core import DatasetError, Version

from partmatch.datasets import (
    NpyDataset,
    SaveError,
    TorchModelDataset,
    make_saves_atomic,
)
from partmatch.tempfiles import parse_temp_name, temp_host, temp_name
from tests.conftest import PROJECT_ROOT

V1, V2 = "2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"


def _sigkill_at(proc: subprocess.Popen, marker: Path, timeout: float, never_reached: str) -> None:
    """SIGKILL ``proc`` as soon as it has written ``marker`` (its kill point); fails with its output if it ends
    first, or with ``never_reached`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, never_reached
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def _figure(value: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, value])
    return fig


def _kedro_dataset(kind: str, path: Path, version: str | None):
    """A kedro-datasets dataset (writes in place by itself) and its file name."""
    from kedro_datasets.json import JSONDataset
    from kedro_datasets.matplotlib import MatplotlibDataset
    from kedro_datasets.pandas import CSVDataset, ParquetDataset
    from kedro_datasets.text import TextDataset

    cls, name = {"csv": (CSVDataset, "t.csv"), "parquet": (ParquetDataset, "t.parquet"),
                 "json": (JSONDataset, "t.json"), "text": (TextDataset, "t.md"),
                 "matplotlib": (MatplotlibDataset, "t.png"), "npy": (NpyDataset, "t.npy"),
                 "torch": (TorchModelDataset, "t.pt")}[kind]
    return cls(filepath=str(path / name), version=Version(None, version)), name


def _payload(kind: str, k: int):
    """Version ``k``'s data, big enough that the cut-short write below stops inside it."""
    rows = 5000 * k
    return {
        "csv": pd.DataFrame({"a": np.arange(rows), "b": ["x" * 20] * rows}),
        "parquet": pd.DataFrame({"a": np.arange(rows), "b": ["y" * 20] * rows}),
        "json": {"values": list(range(rows))},
        "text": "line\n" * rows,
        "matplotlib": _figure(float(k)),
        "npy": np.full((rows, 8), k, dtype=np.uint8),
        "torch": {"state_dict": {"w": torch.full((rows,), float(k))}},
    }[kind]


def _same(kind: str, loaded, expected) -> bool:
    if kind in ("csv", "parquet"):
        return loaded.equals(expected)
    if kind == "npy":
        return np.array_equal(loaded, expected)
    if kind == "torch":
        return torch.equal(loaded["state_dict"]["w"], expected["state_dict"]["w"])
    return loaded == expected


@pytest.fixture
def cut_short(monkeypatch):
    """Every write to a local file from now on writes half its bytes, then fails like a full disk (or ``exc``)."""
    def install(exc: BaseException | None = None):
        def write(self, data, *args, **kwargs):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise exc or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(LocalFileOpener, "write", write)
    yield install
    monkeypatch.undo()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


KINDS = ["csv", "parquet", "json", "text", "matplotlib", "npy", "torch"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_save_cut_short_never_becomes_the_latest_version(tmp_path, kind, cut_short):
    """v1 saved; v2's save fails half-way (disk full): the latest version is still v1, nothing of v2 is left,
    and the error names the dataset and the path (the control without atomic saves is the next test)."""
    ds1, name = _kedro_dataset(kind, tmp_path / "atomic", V1)
    make_saves_atomic(ds1, f"my_{kind}")
    ds1.save(_payload(kind, 1))
    ds2, _ = _kedro_dataset(kind, tmp_path / "atomic", V2)
    make_saves_atomic(ds2, f"my_{kind}")
    cut_short()
    with pytest.raises(DatasetError) as err:
        ds2.save(_payload(kind, 2))
    target = tmp_path / "atomic" / name / V2 / name
    assert f"Cannot save dataset 'my_{kind}' to {target}: No space left on device (ENOSPC)" in str(err.value)
    assert _files(tmp_path / "atomic") == [f"{name}/{V1}/{name}"]          # no temp file, no v2 folder
    if kind != "matplotlib":
        latest, _ = _kedro_dataset(kind, tmp_path / "atomic", None)
        assert _same(kind, latest.load(), _payload(kind, 1))


def test_the_control_without_atomic_saves_leaves_a_half_written_latest_version(tmp_path, monkeypatch):
    """What kedro-datasets does alone (the fault the atomic saves fix): v2 cut short is the latest version."""
    ds1, name = _kedro_dataset("csv", tmp_path, V1)
    ds1.save(_payload("csv", 1))
    ds2, _ = _kedro_dataset("csv", tmp_path, V2)

    def write(self, data, *args, **kwargs):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(LocalFileOpener, "write", write)
    with pytest.raises(DatasetError):
        ds2.save(_payload("csv", 2))
    monkeypatch.undo()
    assert _files(tmp_path) == [f"{name}/{V1}/{name}", f"{name}/{V2}/{name}"]
    latest, _ = _kedro_dataset("csv", tmp_path, None)
    assert latest.resolve_load_version() == V2
    assert len(latest.load()) < len(_payload("csv", 2))   # a truncated table, loaded as the latest version


def test_an_error_while_encoding_mid_write_also_leaves_nothing(tmp_path, cut_short):
    """Not only OSError: any exception raised while the bytes are written (here from the file) removes them."""
    ds, name = _kedro_dataset("parquet", tmp_path, V1)
    make_saves_atomic(ds, "manifest")
    cut_short(RuntimeError("boom while writing"))
    with pytest.raises(DatasetError, match="boom while writing"):
        ds.save(_payload("parquet", 1))
    assert _files(tmp_path) == [] and not (tmp_path / name / V1).exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_folder_names_the_path_and_leaves_no_version(tmp_path, monkeypatch, code):
    ds, name = _kedro_dataset("json", tmp_path / "data", V1)
    make_saves_atomic(ds, "cleaning_counts")

    def refuse(self):
        raise OSError(code, os.strerror(code), self.path)
    monkeypatch.setattr(LocalFileOpener, "_open", refuse)
    with pytest.raises(DatasetError) as err:
        ds.save({"a": 1})
    target = tmp_path / "data" / name / V1 / name
    assert str(err.value).startswith(
        f"Cannot save dataset 'cleaning_counts' to {target}: {os.strerror(code)} ({errno.errorcode[code]}). "
        "Nothing of this version was kept")
    assert "Make that folder writable" in str(err.value)
    assert not (tmp_path / "data" / name / V1).exists()      # the version folder it created is gone again


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the errno tests above cover it")
def test_a_really_read_only_folder(tmp_path):
    ds, _ = _kedro_dataset("csv", tmp_path / "ro", V1)
    make_saves_atomic(ds, "quarantine")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(SaveError, match=r"Cannot save dataset 'quarantine' to .*Permission denied"):
            ds.save(pd.DataFrame({"a": [1]}))
        assert _files(tmp_path / "ro") == []
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_temp_names_are_hidden_and_name_their_process():
    name = temp_name("image_array.npy")
    assert name.startswith(".image_array.npy.tmp-")
    target, _host, pid = parse_temp_name(name)
    assert (target, pid) == ("image_array.npy", os.getpid())
    assert parse_temp_name("image_array.npy") is None


# ------------------------------------------------------------------------- SIGKILL mid-training, then resume

TRAIN_SCRIPT = '''
import json, os, sys, time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
from partmatch.ml.training import checkpoint as engine
from partmatch.ml.data import InMemoryImages
from partmatch.ml.training import TrainConfig, fit, seed_everything
from partmatch.ml.models import build_model
from partmatch.ml.objectives import build_objective

ckpt_dir, out, resume, kill_at, marker = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
rng = np.random.default_rng(0)
images = rng.integers(0, 60, size=(48, 1, 16, 16), dtype=np.uint8)
labels = np.repeat(np.arange(4), 12)
for i, k in enumerate(labels):
    r, c = divmod(int(k), 2)
    images[i, 0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 220
seed_everything(1)
model = build_model("embedding", num_classes=4, embedding_dim=8, in_channels=1, image_size=16, channels=(4, 8))
objective = build_objective("contrastive+proxy_anchor", {"m_per_class": 4}, 4, 8)

where = {"epoch": 0, "batch": 0}
batches, loss = objective.batches, objective.loss
def counting_batches(labels, batch_size, epoch, seed):
    where.update(epoch=epoch, batch=0)
    return batches(labels, batch_size, epoch, seed)
def stalling_loss(model, images, labels):
    where["batch"] += 1
    if kill_at == "mid-epoch" and where["epoch"] == 2 and where["batch"] == 2:  # batch 1 of epoch 2 was a step
        Path(marker).write_text("epoch 2, batch 2")
        time.sleep(600)
    return loss(model, images, labels)
objective.batches, objective.loss = counting_batches, stalling_loss

save = torch.save
def stalling_save(obj, path, *args, **kwargs):
    if kill_at == "mid-save" and Path(path).name.startswith(".last.pt.tmp-") and obj["epoch"] == 2:
        import io
        buf = io.BytesIO()
        save(obj, buf)
        with open(path, "wb") as f:  # half of last.pt of epoch 2 is on disk when the process dies
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        Path(marker).write_text("saving last.pt of epoch 2")
        time.sleep(600)
    return save(obj, path, *args, **kwargs)
engine.torch.save = stalling_save

config = TrainConfig(epochs=3, batch_size=16, lr=1e-2, patience=None, device="cpu", progress=False, seed=3,
                     augment=True, checkpoint_dir=ckpt_dir, resume=resume)
result = fit(model, objective, InMemoryImages(images, labels), None, config)
save({"model": model.state_dict(), "history": [h["train_loss"] for h in result.history],
      "resumed_from_epoch": result.resumed_from_epoch}, out)
'''


def _train(tmp_path: Path, name: str, resume: bool = False, kill_at: str = "never") -> subprocess.Popen:
    script = tmp_path / "train_child.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / name), str(tmp_path / f"{name}.out.pt"), "1" if resume else "0",
         kill_at, str(tmp_path / f"{name}.marker")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _finish(_train(tmp, "full"))
    return torch.load(tmp / "full.out.pt", weights_only=True), torch.load(tmp / "full" / "last.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["mid-epoch", "mid-save"])
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted, kill_at):
    """A real training process is killed with SIGKILL after epoch 1's checkpoint: in the middle of epoch 2 (one
    optimiser step of it already taken), or half-way through writing epoch 2's ``last.pt``. Resuming finishes
    with exactly (``torch.equal``) the weights, optimiser state and losses of a run that was never interrupted:
    CPU, one thread, fixed seed, and the checkpoint holds every RNG state, so the arithmetic is identical."""
    proc = _train(tmp_path, "killed", kill_at=kill_at)
    marker = tmp_path / "killed.marker"
    _sigkill_at(proc, marker, 240, "the training process never reached the kill point")
    assert proc.returncode == -signal.SIGKILL
    ckpt_dir = tmp_path / "killed"
    left = sorted(p.name for p in ckpt_dir.iterdir())
    if kill_at == "mid-save":  # the half-written file kept its temporary name: last.pt is still epoch 1's
        assert left[1:] == ["best.pt", "last.pt"] and parse_temp_name(left[0]) == ("last.pt", temp_host(), proc.pid)
    else:
        assert left == ["best.pt", "last.pt"]
    epoch1 = torch.load(ckpt_dir / "last.pt", weights_only=True)
    assert epoch1["epoch"] == 1

    _finish(_train(tmp_path, "killed", resume=True))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]   # the dead save's temp is gone
    resumed = torch.load(tmp_path / "killed.out.pt", weights_only=True)
    resumed_last = torch.load(ckpt_dir / "last.pt", weights_only=True)
    full, full_last = uninterrupted
    assert resumed["resumed_from_epoch"] == 1 and full["resumed_from_epoch"] is None
    assert resumed["history"] == full["history"] and len(full["history"]) == 3
    assert resumed["model"].keys() == full["model"].keys()
    for k in full["model"]:
        assert torch.equal(resumed["model"][k], full["model"][k]), f"{k} differs after kill + resume"
    assert resumed_last["epoch"] == full_last["epoch"] == 3
    for key in ("model", "objective"):
        for k in full_last[key]:
            assert torch.equal(resumed_last[key][k], full_last[key][k]), f"last.pt {key}.{k} differs"
    # not vacuous: epochs 2 and 3 moved the weights away from the epoch-1 checkpoint the resume started from
    assert not all(torch.equal(epoch1["model"][k], full_last["model"][k]) for k in full_last["model"])


def test_resume_with_another_embedding_dim_names_the_checkpoint_the_change_and_the_fix(tmp_path):
    """Before: ``load_state_dict`` stopped with PyTorch's bare "size mismatch for head...". Now: the file, the
    changed setting, the weights that differ and both fixes."""
    from partmatch.ml.data import InMemoryImages
    from partmatch.ml.training import CheckpointMismatchError, TrainConfig, fit
    from partmatch.ml.models import build_model
    from partmatch.ml.objectives import build_objective

    rng = np.random.default_rng(0)
    data = InMemoryImages(rng.integers(0, 255, size=(32, 1, 16, 16), dtype=np.uint8), np.repeat(np.arange(4), 8))

    def train(dim: int, resume: bool):
        model = build_model("embedding", num_classes=4, embedding_dim=dim, in_channels=1, image_size=16,
                            channels=(4, 8))
        objective = build_objective("triplet", {"sampling": "random"}, 4, dim)
        config = TrainConfig(epochs=2 if resume else 1, batch_size=16, patience=None, device="cpu", progress=False,
                             checkpoint_dir=str(tmp_path / "ckpt"), resume=resume)
        return fit(model, objective, data, None, config)

    train(8, resume=False)
    with pytest.raises(CheckpointMismatchError) as err:
        train(16, resume=True)
    ckpt = tmp_path / "ckpt"
    assert str(err.value) == (
        f"Cannot resume from {ckpt / 'last.pt'}: it was written for another model than the one configured now "
        "(changed: embedding_dim: 8 -> 16). Weights that differ: head.weight [8, 128] -> [16, 128]; head.bias [8] -> "
        "[16]. Either restore the settings it was trained with, or start afresh: set resume: false for this model "
        f"(e.g. --params=<model>.resume=false; the checkpoint is then overwritten) or delete {ckpt}.")
    assert train(8, resume=True).resumed_from_epoch == 1     # the same architecture still resumes


# ------------------------------------------------------------------ a killed kedro run left RUNNING in MLflow


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_whose_process_is_gone_are_marked_killed_and_their_versions_reported(tmp_path, monkeypatch, caplog):
    """Faked runs: a dead pid of this host, a live one, a reused pid (same number, other start time), a dead
    pid of another host, and a run without the tags. Only the dead ones of this host end as KILLED."""
    import mlflow

    from partmatch.tracking import (
        HOST_TAG,
        LEFT_VERSIONS_TAG,
        PID_TAG,
        PROCESS_START_TAG,
        SAVE_VERSION_TAG,
        mark_dead_runs,
        process_tags,
    )

    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("partmatch", artifact_location=(tmp_path / "mlruns").as_uri())
    me = process_tags()
    dead = _dead_pid()
    tags = {
        "dead": {PID_TAG: str(dead), HOST_TAG: me[HOST_TAG], PROCESS_START_TAG: "", SAVE_VERSION_TAG: V2},
        "alive": {**me, SAVE_VERSION_TAG: V1},
        "reused pid": {**me, PROCESS_START_TAG: "1"},
        "other host": {PID_TAG: str(dead), HOST_TAG: "another-machine", SAVE_VERSION_TAG: V1},
        "no tags": {},
    }
    runs = {name: client.create_run(exp, run_name=name, tags=t).info.run_id for name, t in tags.items()}
    data = tmp_path / "data"
    for rel in (f"02_intermediate/raw_manifest.parquet/{V2}/raw_manifest.parquet",
                f"02_intermediate/raw_manifest.parquet/{V1}/raw_manifest.parquet",
                f"08_reporting/ingestion/cleaning_counts.json/{V2}/cleaning_counts.json",
                f"04_feature/image_array.npy/{V2}/{temp_name('image_array.npy')}"):  # the save it was killed in
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"x")

    before = int(time.time() * 1000)
    with caplog.at_level("WARNING", logger="partmatch"):
        killed = mark_dead_runs(client, exp, data, logger=logging.getLogger("partmatch.hooks"))
    after = int(time.time() * 1000)
    left = [f"data/02_intermediate/raw_manifest.parquet/{V2}", f"data/08_reporting/ingestion/cleaning_counts.json/{V2}"]
    assert killed == {runs["dead"]: left, runs["reused pid"]: []}
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "reused pid": "KILLED", "other host": "RUNNING",
                      "no tags": "RUNNING"}
    assert client.get_run(runs["dead"]).data.tags[LEFT_VERSIONS_TAG] == ", ".join(left)
    end = {name: client.get_run(run_id).info.end_time for name, run_id in runs.items()}
    assert before <= end["dead"] <= after and before <= end["reused pid"] <= after     # ended now, by this call
    assert [end[n] for n in ("alive", "other host", "no tags")] == [None, None, None]
    assert not (data / "04_feature" / "image_array.npy" / V2).exists()     # the cut-short save is cleaned up
    assert (data / "02_intermediate" / "raw_manifest.parquet" / V1).exists()
    messages = sorted(r.getMessage() for r in caplog.records if r.name == "partmatch.hooks")
    assert messages == sorted([
        (f"MLflow run {runs['dead']} ('dead', pid {dead}) was still RUNNING but its process is gone (killed): marked "
         "KILLED. It left these dataset versions, complete but from a run that never finished (a later run loads "
         f"them as the latest; resume=true continues from them): {', '.join(left)}"),
        (f"MLflow run {runs['reused pid']} ('reused pid', pid {me[PID_TAG]}) was still RUNNING but its process is "
         "gone (killed): marked KILLED.")])


KILLABLE_KEDRO = '''
import sys, time
from pathlib import Path

import partmatch.datasets as datasets

target, marker = sys.argv[1], sys.argv[2]
close = datasets._AtomicFile.close
def stalling_close(self):  # every byte of the file is written, not yet renamed: the process dies here
    if self._target.endswith(target) and not self._done:
        Path(marker).write_text(self._temp)
        time.sleep(600)
    return close(self)
datasets._AtomicFile.close = stalling_close

from kedro.framework.cli import main
sys.argv = ["kedro", *sys.argv[3:]]
main()
'''


def _kedro_process(project: Path, *args: str, script: str | None = None) -> subprocess.Popen:
    """``kedro <args>`` in ``project`` as its own process (its own src first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(project / "src"), "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "200",
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, script, *args] if script else [sys.executable, "-m", "kedro", *args]
    return subprocess.Popen(command, cwd=project, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _version_folders(data: Path, version: str) -> list[str]:
    return sorted(str(p.relative_to(data.parent)) for p in data.rglob(version) if p.is_dir())


@pytest.mark.slow
def test_a_killed_kedro_run_is_ended_as_killed_by_the_next_run(kedro_project, tiny_catalogue, tmp_path, caplog):
    """A real ``kedro run`` is killed (SIGKILL) while it writes image_array, after ingestion's outputs were saved.
    Before: its MLflow run stayed RUNNING forever. Now the next run marks it KILLED, tags it with the complete
    versions it left (reported, still loadable: a resume continues from them) and deletes the cut-short save."""
    import mlflow

    from partmatch.tracking import LEFT_VERSIONS_TAG, PID_TAG, SAVE_VERSION_TAG

    project = kedro_project.path
    script = tmp_path / "killable_kedro.py"
    script.write_text(KILLABLE_KEDRO)
    marker = tmp_path / "saving"
    proc = _kedro_process(project, "image_array.npy", str(marker), "run", "--pipelines=ingestion,preprocessing",
                          f"--params=raw_source={tiny_catalogue}", script=str(script))
    _sigkill_at(proc, marker, 300, "the run never reached the image_array save")

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("partmatch").experiment_id
    (killed,) = client.search_runs([exp])
    assert killed.info.status == "RUNNING" and killed.data.tags[PID_TAG] == str(proc.pid)   # the fault
    version = killed.data.tags[SAVE_VERSION_TAG]
    temp = Path(marker.read_text())
    assert temp.exists() and temp.parent == project / "data" / "04_feature" / "image_array.npy" / version
    left = [f for f in _version_folders(project / "data", version) if "image_array" not in f]
    assert {f"data/02_intermediate/raw_manifest.parquet/{version}",
            f"data/03_primary/clean_manifest.parquet/{version}"} <= set(left)

    with caplog.at_level("WARNING", logger="partmatch.hooks"):
        kedro_project("ingestion", raw_source=str(tiny_catalogue))
    runs = {r.info.run_id: r for r in client.search_runs([exp])}
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert runs[killed.info.run_id].data.tags[LEFT_VERSIONS_TAG] == ", ".join(left)
    assert sorted(r.info.status for r in runs.values()) == ["FINISHED", "KILLED"]
    assert _version_folders(project / "data", version) == left      # the cut-short image_array is gone
    assert not [p for p in (project / "data").rglob(".*.tmp-*")]
    (warning,) = [r.getMessage() for r in caplog.records if "its process is gone" in r.getMessage()]
    assert warning == (f"MLflow run {killed.info.run_id} ('{killed.info.run_name}', pid {proc.pid}) was still "
                       "RUNNING but its process is gone (killed): marked KILLED. It left these dataset versions, "
                       "complete but from a run that never finished (a later run loads them as the latest; "
                       f"resume=true continues from them): {', '.join(left)}")


@pytest.mark.slow
def test_two_kedro_runs_at_once_keep_their_runs_and_versions_apart(kedro_project, tiny_catalogue):
    """Two ``kedro run`` processes on one project and one SQLite store, with different seeds (so their outputs
    differ): both finish, both are recorded with their model's child run, every artifact of each run is
    byte-for-byte its own version's file, and every version folder holds exactly its one complete file."""
    import json

    import mlflow

    from partmatch.tracking import SAVE_VERSION_TAG

    project = kedro_project.path
    kedro_project("ingestion", raw_source=str(tiny_catalogue))   # the store exists; the two runs start together
    tiny = ("cnn.epochs=2,cnn.max_batches_per_epoch=2,cnn.progress=false,cnn.threshold_pairs=200,"
            "cnn.eval_pairs=200,cnn.batch_size=16,cnn.patience=null,preprocessing.image_size=32")
    procs = [_kedro_process(project, "run", "--pipelines=ingestion,preprocessing,cnn",
                            f"--params=raw_source={tiny_catalogue},split.seed={seed},cnn.seed={seed},{tiny}")
             for seed in (1, 2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("partmatch").experiment_id
    runs = client.search_runs([exp])
    parents = [r for r in runs if set(r.info.run_name.split("+")) == {"ingestion", "preprocessing", "cnn"}]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"], [
        (r.info.run_name, r.info.status) for r in runs]
    versions = [r.data.tags[SAVE_VERSION_TAG] for r in parents]
    assert len(set(versions)) == 2
    data = project / "data"
    written = [_version_folders(data, v) for v in versions]
    assert [f.rsplit("/", 1)[0] for f in written[0]] == [f.rsplit("/", 1)[0] for f in written[1]]
    for version in versions:
        for folder in _version_folders(data, version):     # one complete file per version, no temporary file
            assert sorted(p.name for p in (project / folder).iterdir()) == [Path(folder).parent.name], folder

    for parent, version, other in zip(parents, versions, reversed(versions), strict=True):
        (child,) = [r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert child.info.status == "FINISHED" and child.data.tags["model"] == "cnn"
        local = Path(client.download_artifacts(parent.info.run_id, "", str(project / f"dl-{version}")))
        logged = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        assert {"cleaning_counts.json", "split_summary.json"} <= {Path(p).name for p in logged}, logged
        for path in logged:
            name = Path(path).name
            (own,) = [p for p in data.rglob(f"{name}/{version}/{name}")]
            assert (local / path).read_bytes() == own.read_bytes(), f"{path} of run {version} is not its own version"
        theirs = next(data.rglob(f"split_summary.json/{other}/split_summary.json")).read_bytes()
        assert next(local.rglob("split_summary.json")).read_bytes() != theirs   # the seeds did make them differ
        child_dir = Path(client.download_artifacts(child.info.run_id, "metrics.json", str(project / f"m-{version}")))
        own_metrics = json.loads(next(data.rglob(f"cnn/metrics.json/{version}/metrics.json")).read_text())
        assert json.loads(child_dir.read_text()) == own_metrics


def test_a_run_loads_the_version_it_saved_not_a_newer_one_of_another_run(tmp_path):
    """Found by running two ``kedro run`` at once: Kedro loads the newest version on disk, so one run's node read
    the other run's ``cnn.embeddings`` (saved a moment later). A dataset a run saved is now loaded in its own
    version; one it did not save still loads the newest (the control)."""
    from kedro.io import DataCatalog
    from kedro.pipeline import Node, Pipeline
    from kedro_datasets.pandas import CSVDataset

    from partmatch.hooks import AtomicSavesHook

    def config(name):
        return {"type": "pandas.CSVDataset", "filepath": str(tmp_path / f"{name}.csv"), "versioned": True}

    mine, newer = pd.DataFrame({"run": ["this one"]}), pd.DataFrame({"run": ["the other one"]})

    def run(with_hook: bool):
        catalog = DataCatalog.from_config({"ours": config("ours"), "theirs": config("theirs")}, save_version=V1)
        hook = AtomicSavesHook()
        if with_hook:
            hook.before_pipeline_run({}, Pipeline([Node(lambda x: x, "theirs", "ours", name="n")]), catalog)
        # the other run started a moment later (newer save version) but saved first
        for name in ("ours", "theirs"):
            CSVDataset(filepath=str(tmp_path / f"{name}.csv"), version=Version(None, V2)).save(newer)
        catalog.save("ours", mine)
        hook.after_dataset_saved("ours", mine, None)
        return catalog

    with pytest.warns(UserWarning, match="Save version '.*' did not match load version"):
        control = run(with_hook=False)
    assert control.load("ours").equals(newer)            # the fault: this run reads the other run's version
    for folder in tmp_path.iterdir():
        shutil.rmtree(folder)
    catalog = run(with_hook=True)
    assert catalog.load("ours").equals(mine)
    assert catalog.load("theirs").equals(newer)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_or_read_only_output_folder_stops_the_run_naming_dataset_and_path(kedro_project, photo_folder,
                                                                                        monkeypatch, code):
    """``kedro run --pipeline=ingestion`` whose ``data/03_primary`` is read-only (EROFS when the file is opened)
    or whose disk fills up while clean_manifest is written (ENOSPC after half its bytes). Root ignores ``chmod``,
    hence the errno raised where the kernel would raise it. The run fails with the dataset and its path named,
    and no clean_manifest version (complete or partial) nor any temporary file is left."""
    data = kedro_project.path / "data"
    write, open_ = LocalFileOpener.write, LocalFileOpener._open

    def full_disk(self, chunk, *args, **kwargs):
        if "clean_manifest.parquet" in self.path:
            self.f.write(chunk[: len(chunk) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, chunk, *args, **kwargs)

    def read_only(self):
        if str(data / "03_primary") in self.path and "w" in self.mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.path)
        return open_(self)

    if code == errno.ENOSPC:
        monkeypatch.setattr(LocalFileOpener, "write", full_disk)
    else:
        monkeypatch.setattr(LocalFileOpener, "_open", read_only)
    with pytest.raises(DatasetError) as err:
        kedro_project("ingestion", raw_source=str(photo_folder))
    monkeypatch.undo()
    message = str(err.value)
    prefix = f"Cannot save dataset 'clean_manifest' to {data / '03_primary' / 'clean_manifest.parquet'}/"
    assert prefix in message and f": {os.strerror(code)} ({errno.errorcode[code]}). Nothing of this version was " \
        "kept (the partly written file was removed), so the latest complete version is unchanged." in message
    assert not (data / "03_primary").exists() or not list((data / "03_primary").rglob("*"))
    assert not list(data.rglob(".*.tmp-*"))
    assert len(list((data / "02_intermediate" / "raw_manifest.parquet").iterdir())) == 1   # saved before, complete


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """``last.pt`` of epoch 2 cannot be written (ENOSPC half-way): the error names the file, epoch 1's ``last.pt``
    is intact and no temporary file is left, so ``resume`` continues from epoch 1."""
    from partmatch.ml.training import checkpoint as engine
    from partmatch.ml.data import InMemoryImages
    from partmatch.ml.training import TrainConfig, fit
    from partmatch.ml.models import build_model
    from partmatch.ml.objectives import build_objective

    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2 and "last.pt" in str(path):
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(engine.torch, "save", full_disk)
    rng = np.random.default_rng(0)
    data = InMemoryImages(rng.integers(0, 255, size=(32, 1, 16, 16), dtype=np.uint8), np.repeat(np.arange(4), 8))
    model = build_model("embedding", num_classes=4, embedding_dim=8, in_channels=1, image_size=16, channels=(4, 8))
    config = TrainConfig(epochs=2, batch_size=16, patience=None, device="cpu", progress=False,
                         checkpoint_dir=str(tmp_path), resume=False)
    with pytest.raises(OSError) as err:
        fit(model, build_objective("triplet", {"sampling": "random"}, 4, 8), data, None, config)
    assert str(err.value) == (
        f"[Errno {errno.ENOSPC}] Cannot write checkpoint {tmp_path / 'last.pt'}: No space left on device (the "
        f"previous checkpoint is unchanged; free disk space or make {tmp_path} writable, or set checkpoint_dir to "
        "null)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_kedro_run_resuming_with_another_embedding_dim_prints_the_fix(kedro_project, tiny_catalogue):
    """``kedro run --params=siamese_contrastive.embedding_dim=32,siamese_contrastive.resume=true`` after a run at
    16: before, a raw "size mismatch" traceback; now one message (exit status 2) naming the checkpoint, the
    changed setting and the fix."""
    from tests.test_config import kedro_cli

    tiny = {"epochs": 1, "max_batches_per_epoch": 2, "progress": False, "threshold_pairs": 200, "eval_pairs": 200,
            "batch_size": 16, "patience": None, "embedding_dim": 16}
    common = {"raw_source": str(tiny_catalogue), "preprocessing": {"image_size": 32}}
    kedro_project(["ingestion", "preprocessing"], **common)
    kedro_project("siamese_contrastive", **common, siamese_contrastive=tiny)
    params = ",".join([f"raw_source={tiny_catalogue}", "preprocessing.image_size=32",
                       *(f"siamese_contrastive.{k}={'null' if v is None else v}" for k, v in tiny.items()
                         if k != "embedding_dim"),
                       "siamese_contrastive.embedding_dim=32", "siamese_contrastive.resume=true"])
    proc = kedro_cli(kedro_project.path, "run", "--pipeline=siamese_contrastive", f"--params={params}", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    ckpt = "data/06_models/siamese_contrastive/checkpoints"
    assert last.startswith(f"Error: Cannot resume from {ckpt}/last.pt: it was written for another model than the "
                           "one configured now (changed: embedding_dim: 16 -> 32). Weights that differ: head.")
    assert last.endswith("set resume: false for this model (e.g. --params=<model>.resume=false; the checkpoint is "
                         f"then overwritten) or delete {ckpt}.")


def test_resume_on_other_data_is_refused(tmp_path):
    """A ``last.pt`` trained on another training set (another source or split seed, or written by another run in
    the shared checkpoint folder) is not continued silently: the message names the file, both sets and the fix."""
    import hashlib

    from partmatch.ml.data import InMemoryImages
    from partmatch.ml.training import CheckpointMismatchError, TrainConfig, fit
    from partmatch.ml.models import build_model
    from partmatch.ml.objectives import build_objective

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(32, 1, 16, 16), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 8)

    def train(images, resume):
        model = build_model("embedding", num_classes=4, embedding_dim=8, in_channels=1, image_size=16,
                            channels=(4, 8))
        config = TrainConfig(epochs=2 if resume else 1, batch_size=16, patience=None, device="cpu", progress=False,
                             checkpoint_dir=str(tmp_path), resume=resume)
        return fit(model, build_objective("triplet", {"sampling": "random"}, 4, 8), InMemoryImages(images, labels),
                   None, config)

    def digest(images):
        h = hashlib.sha256()
        for a in (torch.from_numpy(images), torch.from_numpy(labels)):
            h.update(f"{a.dtype}{tuple(a.shape)}".encode())
            h.update(a.contiguous().view(-1).view(torch.uint8).numpy())
        return h.hexdigest()[:12]

    train(pixels, resume=False)
    other = pixels[::-1].copy()
    with pytest.raises(CheckpointMismatchError) as err:
        train(other, resume=True)
    assert str(err.value) == (
        f"Cannot resume from {tmp_path / 'last.pt'}: it was trained on other data (32 training images, digest "
        f"{digest(pixels)}) than this run's (32 images, digest {digest(other)}): another source, split or "
        "preprocessing, or another run wrote it. Start afresh: set resume: false for this model (e.g. "
        f"--params=<model>.resume=false) or delete {tmp_path}; or resume on the data it was trained on.")
    assert train(pixels, resume=True).resumed_from_epoch == 1


KILLABLE_TRAINING = '''
import sys, time
from pathlib import Path

import torch

marker, stop_before_step = sys.argv[1], int(sys.argv[2])
steps = {"n": 0}
step = torch.optim.Adam.step
def stalling_step(self, *args, **kwargs):  # the process dies before this optimiser step, mid-epoch
    steps["n"] += 1
    if steps["n"] == stop_before_step:
        Path(marker).write_text(str(steps["n"]))
        time.sleep(600)
    return step(self, *args, **kwargs)
torch.optim.Adam.step = stalling_step

from kedro.framework.cli import main
sys.argv = ["kedro", *sys.argv[3:]]
main()
'''


@pytest.mark.slow
def test_kedro_run_killed_mid_epoch_then_resumed_trains_the_uninterrupted_model(kedro_project, tiny_catalogue,
                                                                                 tmp_path):
    """The whole ``cnn`` pipeline as users run it: a ``kedro run`` killed (SIGKILL) in epoch 2 after one of its
    optimiser steps, then ``kedro run --params=cnn.resume=true``: its ``model.pt`` has exactly the weights of an
    uninterrupted run on the same data (another checkpoint folder)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the killed process (OMP_NUM_THREADS=1): float sums in the same order
    try:
        _kill_and_resume_cnn(kedro_project, tiny_catalogue, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume_cnn(kedro_project, tiny_catalogue, tmp_path) -> None:
    from partmatch.datasets import TorchModelDataset

    common = {"raw_source": str(tiny_catalogue), "preprocessing": {"image_size": 32}}
    kedro_project(["ingestion", "preprocessing"], **common)
    cnn = {"epochs": 3, "max_batches_per_epoch": 2, "progress": False, "threshold_pairs": 200, "eval_pairs": 200,
           "batch_size": 16, "patience": None, "device": "cpu"}
    kedro_project("cnn", **common, cnn={**cnn, "checkpoint_dir": "data/06_models/cnn/uninterrupted"})

    script, marker = tmp_path / "killable_training.py", tmp_path / "stepping"
    script.write_text(KILLABLE_TRAINING)
    params = ",".join([f"raw_source={tiny_catalogue}", "preprocessing.image_size=32",
                       *(f"cnn.{k}={'null' if v is None else v}" for k, v in cnn.items())])
    proc = _kedro_process(kedro_project.path, str(marker), "4", "run", "--pipeline=cnn", f"--params={params}",
                          script=str(script))  # epoch 1 = steps 1-2 (checkpointed), step 3 done, dies before 4
    _sigkill_at(proc, marker, 300, "training never reached epoch 2")
    ckpt = kedro_project.path / "data" / "06_models" / "cnn" / "checkpoints"
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 1

    kedro_project("cnn", **common, cnn={**cnn, "resume": True})
    models = kedro_project.path / "data" / "06_models" / "cnn" / "model.pt"
    uninterrupted, resumed = (TorchModelDataset(filepath=str(models), version=Version(v.name, None)).load()
                              for v in sorted(models.iterdir()))
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == 3
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys()
    for k, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], value), \
            f"{k} differs after kill + resume by {(resumed['state_dict'][k] - value).abs().max().item():.3g}"
