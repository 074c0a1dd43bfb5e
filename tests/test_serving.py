"""The served model: `kedro run --pipeline=<model>` logs it (kedro-mlflow pipeline_ml_factory); the real
`mlflow models serve` answers photos with part names, distances and verdicts, and malformed requests with 4xx."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import (
    experiment_runs,
    free_port,
    make_photo,
    new_kedro_project,
    png_bytes,
    tracking_client,
)

MODEL = "siamese_triplet"
TINY = {"epochs": 1, "max_batches_per_epoch": 3, "progress": False, "threshold_pairs": 200, "eval_pairs": 200,
        "batch_size": 16}


def _logged_models(project: Path, run_id: str) -> list:
    client = tracking_client(project)
    exp = client.get_experiment_by_name("partmatch")
    return [m for m in client.search_logged_models(experiment_ids=[exp.experiment_id])
            if m.source_run_id == run_id]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_catalogue):
    """A throw-away project (as conftest.kedro_project) where `kedro run --pipeline=siamese_triplet` ran once."""
    root = tmp_path_factory.mktemp("serving")
    catalogue = tiny_catalogue
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run = new_kedro_project(root / "project")
        project = run.path
        mp.chdir(project)
        common = {"raw_source": str(catalogue), "preprocessing": {"image_size": 32}}
        run(["ingestion", "preprocessing"], **common)
        run([MODEL], **common, **{MODEL: dict(TINY)})
    runs = experiment_runs(project)
    parent = next(r for r in runs if r.info.run_name == MODEL and "mlflow.parentRunId" not in r.data.tags)
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    from partmatch.ml.retrieval import GalleryIndex

    index_file = max((project / "data" / "06_models" / MODEL / "gallery_index.faissidx").glob("*/*"))
    return {"project": project, "catalogue": catalogue, "parent": parent, "child": child,
            "gallery": GalleryIndex.load(index_file).metadata}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _catalogue_photos(trained, n: int = 2) -> list[tuple[str, str, bytes]]:
    """(path, part name, bytes) of catalogue photos that are in the gallery index, from different parts."""
    meta = trained["gallery"].drop_duplicates("label").head(n)
    return [(p, lab, (trained["catalogue"] / p).read_bytes()) for p, lab in zip(meta["path"], meta["label"])]


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _request(photos: list[tuple[str, bytes]], params: dict | None = None, column: str = "image") -> bytes:
    body = {"dataframe_split": {"columns": [column, "name"], "data": [[_b64(b), n] for n, b in photos]}}
    if params:
        body["params"] = params
    return json.dumps(body).encode()


def test_signature_and_request_parameters():
    from partmatch import serving

    sig = serving.signature()
    assert sig.inputs.input_names() == ["image", "name"] and sig.inputs.required_input_names() == ["image"]
    assert {p.name: p.default for p in sig.params.params} == {"top_k": 5, "threshold": -1.0}
    from partmatch.pipeline_registry import register_pipelines

    pipelines = register_pipelines()
    from kedro_mlflow.pipeline.pipeline_ml import PipelineML

    for model in ("cnn", "siamese_contrastive", "siamese_triplet", "siamese_pretrained", "multi_objective",
                  "siamese_pca"):
        p = pipelines[model]
        assert isinstance(p, PipelineML) and p.log_model_kwargs["name"] == model
        assert p.inference.inputs() == {f"{model}.query_images", f"{model}.model", f"{model}.gallery_index",
                                        "params:top_k", "params:threshold"}
    assert not isinstance(pipelines["__default__"], PipelineML)   # summed: kedro-mlflow logs no model there


def test_bad_requests_raise_400_exceptions_in_process():
    """Without a server: the checks that make MLflow answer 400 with the message."""
    from partmatch.pipelines.serving.nodes import read_request
    from partmatch.serving import BadRequest

    with pytest.raises(BadRequest, match="no 'image' column") as err:
        read_request(pd.DataFrame({"photo": [b"x"]}))
    assert err.value.get_http_status_code() == 400
    with pytest.raises(BadRequest, match="holds no photo"):
        read_request(pd.DataFrame({"image": []}))
    table = read_request(pd.DataFrame({"image": [b"a", bytearray(b"b")], "name": ["first", None]}))
    assert list(table["name"]) == ["first", "1"] and list(table["image"]) == [b"a", b"b"]


def test_logged_identification_model_predicts_in_process(tmp_path, monkeypatch):
    """Fast: a tiny trained bundle and its gallery index logged with log_identification_model, loaded back with
    mlflow.pyfunc: each catalogue photo is found as itself; unreadable photos are reported per row."""
    import mlflow
    import numpy as np
    from kedro.io import DataCatalog

    from partmatch import serving
    from partmatch.config import TrainingParams
    from partmatch.datasets import GalleryIndexDataset, TorchModelDataset
    from partmatch.imaging import preprocess_bytes
    from partmatch.ml import workflow
    from partmatch.ml.retrieval import GalleryIndex

    blobs, rows = [], []
    for c in range(4):
        for i in range(5):
            blobs.append(png_bytes(make_photo(c, size=(48 + 4 * c, 40), seed=10 * c + i)))
            rows.append({"path": f"part{c}/{i}.png", "label": f"part{c}", "split": "train" if i < 4 else "val"})
    index = pd.DataFrame(rows)
    images = np.stack([preprocess_bytes(b, image_size=32, color_mode="grayscale") for b in blobs])
    p = TrainingParams(epochs=1, batch_size=8, m_per_class=2, progress=False, threshold_pairs=20, eval_pairs=20,
                       patience=None, embedding_dim=8, loss="triplet", normalize=True, margin=0.2)
    bundle, _, _ = workflow.train(images, index, p, None, {"image_size": 32, "color_mode": "grayscale",
                                                           "background": 255})
    emb = workflow.embed_all(bundle, images, device="cpu")
    bundle, *_ = workflow.calibrate_threshold(bundle, emb, index, p)
    catalog = DataCatalog({"tiny.model": TorchModelDataset(filepath=str(tmp_path / "model.pt")),
                           "tiny.gallery_index": GalleryIndexDataset(filepath=str(tmp_path / "index.bin"))})
    catalog.save("tiny.model", bundle)
    catalog.save("tiny.gallery_index", GalleryIndex(emb, index["label"].tolist(), ids=index["path"].tolist(),
                                                    distance=bundle.get("distance", "euclidean")))

    monkeypatch.chdir(tmp_path)  # MLflow's SQLite store creates ./mlruns for its Default experiment
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("t", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    info = serving.log_identification_model("tiny", catalog, run_id)
    (logged,) = client.search_logged_models(experiment_ids=[exp])   # in the run's experiment, not Default
    assert logged.source_run_id == run_id and logged.name == "tiny" and info.model_id == logged.model_id
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/tiny")      # the run's URI resolves to it too
    assert serving.latest_model_uri("tiny", experiment="t") == f"models:/{logged.model_id}"
    with pytest.raises(LookupError, match="kedro run --pipeline=cnn"):
        serving.latest_model_uri("cnn", experiment="t")
    assert pyfunc.metadata.get_params_schema().params[0].name == "top_k"

    out = pyfunc.predict(pd.DataFrame({"image": [blobs[0], blobs[7], b"plain text", b""],
                                       "name": ["a", "b", "notes.txt", "empty"]}), params={"top_k": 3})
    assert list(out["name"]) == ["a", "b", "notes.txt", "empty"]
    for row, path in zip(out.head(2).itertuples(), ["part0/0.png", "part1/2.png"]):
        assert row.verdict == "known" and row.part == path.split("/")[0] and row.error is None
        assert row.top_items[0] == path and row.top_distances[0] == pytest.approx(0, abs=1e-4)
        assert len(row.top_parts) == 3 and row.threshold == pytest.approx(bundle["unknown_threshold"])
    assert list(out["verdict"][2:]) == ["error", "error"] and all(out["error"][2:])
    # per-request threshold 0: only an exact catalogue photo is known
    (row,) = pyfunc.predict(pd.DataFrame({"image": [png_bytes(make_photo(9, seed=123))]}),
                            params={"threshold": 0.0}).itertuples()
    assert row.verdict == "unknown part" and row.part == "unknown part" and row.name == "0"
    with pytest.raises(mlflow.exceptions.MlflowException, match="could be read"):
        pyfunc.predict(pd.DataFrame({"image": [b"not a photo"]}))
    with pytest.raises(mlflow.exceptions.MlflowException, match="top_k"):
        pyfunc.predict(pd.DataFrame({"image": [blobs[0]]}), params={"top_k": 0})


@pytest.mark.slow
def test_logged_model_predicts_in_process(trained):
    """The model in the model's child run, loaded with mlflow.pyfunc: catalogue photos come back as themselves."""
    import mlflow

    project = trained["project"]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    (model,) = _logged_models(project, trained["child"].info.run_id)
    assert model.name == MODEL
    # the newest logged model of siamese_triplet, as `python -m partmatch.serving MODEL` prints it for serving
    cli = subprocess.run([sys.executable, "-m", "partmatch.serving", MODEL], cwd=project, capture_output=True,
                         text=True, check=True)
    assert cli.stdout.strip() == f"models:/{model.model_id}"
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    photos = _catalogue_photos(trained)
    rows = pd.DataFrame({"image": [b for _, _, b in photos] + [b"not a photo at all"],
                         "name": [p for p, _, _ in photos] + ["notes.txt"]})
    out = pyfunc.predict(rows, params={"top_k": 3})
    assert list(out["name"]) == [p for p, _, _ in photos] + ["notes.txt"]
    for (path, label, _), (_, row) in zip(photos, out.head(len(photos)).iterrows()):
        assert row["verdict"] == "known" and row["part"] == label and row["error"] is None
        assert row["top_items"][0] == path and row["top_distances"][0] == pytest.approx(0, abs=1e-3)
        # a catalogue photo is its own nearest item (distance ~0): it decides the vote alone
        assert len(row["top_parts"]) == 3 and row["confidence"] == pytest.approx(1.0, abs=1e-6)
    bad = out.iloc[-1]
    assert bad["verdict"] == "error" and bad["part"] is None and bad["error"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="image"):
        pyfunc.predict(pd.DataFrame({"photo": [photos[0][2]]}))


@pytest.mark.slow
def test_run_logs_one_version_of_each_file(trained):
    """The served model in the `kedro run` run holds this run's model.pt and gallery index, not every version."""
    import mlflow

    project = trained["project"]
    (model,) = _logged_models(project, trained["parent"].info.run_id)
    assert model.name == MODEL
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}",
                                                     tracking_uri=f"sqlite:///{project / 'mlflow.db'}"))
    files = sorted(p.relative_to(local).as_posix() for p in (local / "artifacts").rglob("*") if p.is_file())
    assert sorted(f.split("/")[-1] for f in files if "params_" not in f) == ["gallery_index.faissidx", "model.pt"]
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    params = {p["name"]: p["default"] for p in json.loads(mlmodel["signature"]["params"])}
    assert params == {"top_k": 5, "threshold": -1.0}


@pytest.mark.slow
@pytest.mark.timeout(420)   # the server may take up to 240 s to answer /ping on a loaded machine
def test_served_model_answers_photos_and_rejects_malformed_requests(trained, tmp_path):
    project = trained["project"]
    (model,) = _logged_models(project, trained["parent"].info.run_id)
    port = free_port()
    # the scoring server execs `uvicorn` from PATH: the virtual environment's bin must be on it even when the
    # tests run as .venv/bin/python without an activated environment (make test, CI)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    log = (tmp_path / "server.log").open("wb")
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", f"models:/{model.model_id}", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, "server exited:\n" + (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert time.monotonic() < deadline, "no /ping answer:\n" + (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)

        photos = _catalogue_photos(trained)
        stranger = png_bytes(make_photo(5, size=(70, 50), seed=999))
        status, body = _post(f"{base}/invocations",
                             _request([(p, b) for p, _, b in photos] + [("stranger.png", stranger)],
                                      params={"top_k": 2}))
        assert status == 200, body
        answers = json.loads(body)["predictions"]
        assert [a["name"] for a in answers] == [p for p, _, _ in photos] + ["stranger.png"]
        for (path, label, _), a in zip(photos, answers):
            assert a["verdict"] == "known" and a["part"] == label and a["error"] is None
            assert a["top_items"][0] == path and a["top_parts"][0] == label
            assert a["top_distances"][0] == pytest.approx(0, abs=1e-3) and len(a["top_parts"]) == 2
        s = answers[-1]   # a photo of no catalogue part: the verdict follows the nearest distance and the threshold
        assert s["verdict"] == ("unknown part" if s["nearest_distance"] > s["threshold"] else "known")
        assert len(s["top_distances"]) == 2 and s["nearest_distance"] == pytest.approx(s["top_distances"][0])

        # threshold per request: 0 rejects anything that is not a catalogue photo itself
        status, body = _post(f"{base}/invocations", _request([("stranger.png", stranger)], params={"threshold": 0.0}))
        assert status == 200, body
        (a,) = json.loads(body)["predictions"]
        assert a["verdict"] == "unknown part" and a["part"] == "unknown part" and a["threshold"] == 0.0

        # a batch with one unreadable photo: the good one answered, the bad one reported on its row
        status, body = _post(f"{base}/invocations",
                             _request([("good", photos[0][2]), ("notes.txt", b"this is text, not a photo")]))
        assert status == 200, body
        good, bad = json.loads(body)["predictions"]
        assert good["part"] == photos[0][1] and bad["verdict"] == "error" and bad["error"]

        # malformed requests: 4xx with a message
        for what, payload, expect in [
            ("not an image", _request([("notes.txt", b"this is text, not a photo")]), "could be read"),
            ("empty photo", _request([("empty.jpg", b"")]), "could be read"),
            ("wrong column", _request([("p", photos[0][2])], column="photo"), "image"),
            ("no rows", json.dumps({"dataframe_split": {"columns": ["image"], "data": []}}).encode(), "no photo"),
            ("bad top_k", _request([("p", photos[0][2])], params={"top_k": 0}), "top_k"),
            ("empty body", b"", ""),
        ]:
            status, body = _post(f"{base}/invocations", payload)
            assert 400 <= status < 500, f"{what}: {status} {body[:500]}"
            message = json.loads(body).get("message", "") if body.startswith("{") else body
            assert message, f"{what}: no message"
            assert expect in message, f"{what}: {message[:500]}"
    finally:
        # the server's uvicorn workers share the process group this test started for it
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
