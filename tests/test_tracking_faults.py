"""Tracking-store faults: MLFLOW_TRACKING_URI is honoured, an unreachable server stops the run at its start
naming the URI, and two first runs at once on a fresh project both finish (MLflow's SQLite set-up is locked)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from partmatch.config import ParameterError
from partmatch.hooks import TrackingStoreError, check_tracking_server
from tests.conftest import new_kedro_project
from tests.test_config import kedro_cli


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unreachable(uri: str, reason: str = "[Errno 111] Connection refused") -> str:
    return (f"MLflow tracking server {uri} is unreachable ({reason}). Start it (e.g. `mlflow server --host "
            "127.0.0.1 --port PORT`) or point server.mlflow_tracking_uri in conf/local/mlflow.yml or the "
            "MLFLOW_TRACKING_URI environment variable at a reachable one.")


@pytest.fixture
def bare_project(tmp_path, monkeypatch):
    """A project copy whose conf/local sets no tracking URI (conf/base's default applies)."""
    monkeypatch.chdir(tmp_path)
    run = new_kedro_project(tmp_path / "project")
    (run.path / "conf" / "local" / "mlflow.yml").unlink()
    monkeypatch.chdir(run.path)
    return run


def _session_uri(project) -> str:
    from kedro.framework.session import KedroSession

    with KedroSession.create(project_path=project) as session:
        return session.load_context().mlflow.server.mlflow_tracking_uri


@pytest.mark.slow
def test_tracking_uri_precedence(bare_project, tmp_path, monkeypatch):
    """conf/local/mlflow.yml > MLFLOW_TRACKING_URI > sqlite:///mlflow.db (relative to the project, the cwd)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _session_uri(bare_project.path) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert _session_uri(bare_project.path) == f"sqlite:///{tmp_path / 'env.db'}"
    (bare_project.path / "conf" / "local" / "mlflow.yml").write_text(
        f"server:\n  mlflow_tracking_uri: sqlite:///{tmp_path / 'local.db'}\n")
    assert _session_uri(bare_project.path) == f"sqlite:///{tmp_path / 'local.db'}"


@pytest.mark.slow
def test_run_is_recorded_where_mlflow_tracking_uri_says(bare_project, photo_folder, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    bare_project("ingestion", raw_source=str(photo_folder))
    assert not (bare_project.path / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("partmatch").experiment_id])
    assert [(r.info.status, r.info.run_name) for r in runs] == [("FINISHED", "ingestion")]


def test_unreachable_server_in_mlflow_yml_fails_at_the_start(kedro_project, photo_folder):
    uri = f"http://127.0.0.1:{_closed_port()}"
    (kedro_project.path / "conf" / "local" / "mlflow.yml").write_text(f"server:\n  mlflow_tracking_uri: {uri}\n")
    with pytest.raises(TrackingStoreError) as err:
        kedro_project("ingestion", raw_source=str(photo_folder))
    assert str(err.value) == _unreachable(uri)
    assert not list((kedro_project.path / "data").rglob("*.parquet"))


def test_a_parameter_error_comes_before_the_server_check(kedro_project, photo_folder):
    uri = f"http://127.0.0.1:{_closed_port()}"
    (kedro_project.path / "conf" / "local" / "mlflow.yml").write_text(f"server:\n  mlflow_tracking_uri: {uri}\n")
    with pytest.raises(ParameterError, match=r"'preprocessing\.image_size'.*got -5"):
        kedro_project("ingestion", raw_source=str(photo_folder), preprocessing={"image_size": -5})


def test_silent_server_times_out_naming_the_uri():
    """A server that accepts the connection but never answers: refused after the probe's timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(TrackingStoreError) as err:
            check_tracking_server(uri, timeout=0.5)
    assert str(err.value) == _unreachable(uri, "timed out")


def test_sqlite_and_answering_servers_pass_the_check():
    import http.server
    import threading

    check_tracking_server("sqlite:///nowhere/mlflow.db")   # not a server: nothing to probe
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_tracking_server(f"http://127.0.0.1:{server.server_port}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_kedro_run_with_unreachable_mlflow_tracking_uri_prints_one_message(bare_project, photo_folder):
    uri = f"http://127.0.0.1:{_closed_port()}"
    proc = kedro_cli(bare_project.path, "run", "--pipeline=ingestion", f"--params=raw_source={photo_folder}",
                     env={"MLFLOW_TRACKING_URI": uri}, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"Error: {_unreachable(uri)}"
    assert not list((bare_project.path / "data").rglob("*.parquet"))


@pytest.mark.slow
def test_two_first_runs_at_once_on_a_fresh_project(bare_project, photo_folder, monkeypatch):
    """Both create the default SQLite store at the same moment: the lock serialises MLflow's table set-up."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = bare_project.path
    assert not (project / "mlflow.db").exists()
    args = [sys.executable, "-m", "kedro", "run", "--pipeline=ingestion", f"--params=raw_source={photo_folder}"]
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"PYTHONPATH": str(project / "src"), "KEDRO_DISABLE_TELEMETRY": "1"})
    procs = [subprocess.Popen(args, cwd=project, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("partmatch").experiment_id])
    assert sorted((r.info.status, r.info.run_name) for r in runs) == [("FINISHED", "ingestion")] * 2
