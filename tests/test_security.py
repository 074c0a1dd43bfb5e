"""Security contracts (issue 11), each checked by a scan that fails on the first violation and is itself tested on
code that violates it: every ``torch.load`` is ``weights_only=True``; nothing unpickles a file (no pickle, joblib,
``np.load(allow_pickle=True)``, ``pd.read_pickle``, ``yaml.load`` without a safe loader, no ``PickleDataset`` in the
catalog); every server the project starts listens on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import ast
import re
import shlex

import yaml

from tests.conftest import PROJECT_ROOT

SRC = PROJECT_ROOT / "src" / "partmatch"

# call (as written: module alias resolved) -> why it is refused
FORBIDDEN_CALLS = {
    "pickle.load": "unpickles arbitrary code", "pickle.loads": "unpickles arbitrary code",
    "pickle.Unpickler": "unpickles arbitrary code", "cloudpickle.load": "unpickles arbitrary code",
    "cloudpickle.loads": "unpickles arbitrary code", "dill.load": "unpickles arbitrary code",
    "dill.loads": "unpickles arbitrary code", "joblib.load": "unpickles arbitrary code",
    "pandas.read_pickle": "unpickles arbitrary code", "torch.jit.load": "loads TorchScript code",
    "yaml.unsafe_load": "constructs arbitrary Python objects", "marshal.loads": "loads code objects",
    "shelve.open": "unpickles arbitrary code",
}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> full dotted name for every import in ``tree`` (``import numpy as np`` -> np: numpy)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(aliases.get(func.id, func.id))
    name = ".".join(reversed(parts))
    return {"np.load": "numpy.load", "pd.read_pickle": "pandas.read_pickle"}.get(name, name)


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """'file:line: what' for every call in ``source`` that can unpickle or run code from a file."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        where = f"{filename}:{node.lineno}"
        if name in ("torch.load", "torch.serialization.load") and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name == "numpy.load" and not (_keyword(node, "allow_pickle") is None
                                           or _is_const(_keyword(node, "allow_pickle"), False)):
            found.append(f"{where}: numpy.load with allow_pickle other than False")
        elif name == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = _dotted(loader, aliases) if loader is not None else None
            if loader_name not in {"yaml.SafeLoader", "yaml.CSafeLoader"}:
                found.append(f"{where}: yaml.load without SafeLoader")
        elif name in FORBIDDEN_CALLS:
            found.append(f"{where}: {name} {FORBIDDEN_CALLS[name]}")
    return found


def test_the_scanner_finds_every_kind_of_unsafe_load():
    bad = """
import pickle, joblib, yaml
import numpy as np
import torch as T
from torch import load
import pandas as pd
T.load(f)
T.load(f, weights_only=False)
load(f, weights_only=flag)
T.serialization.load(f)
np.load(f, allow_pickle=True)
pickle.loads(b)
joblib.load(f)
pd.read_pickle(f)
yaml.load(s, Loader=yaml.Loader)
"""
    assert [line.split(": ", 1)[0] for line in unsafe_loads(bad)] == [f"<string>:{n}" for n in range(7, 16)]
    good = """
import torch, yaml
import numpy as np
torch.load(f, map_location="cpu", weights_only=True)
np.load(f)
np.load(f, allow_pickle=False)
yaml.load(s, Loader=yaml.SafeLoader)
yaml.safe_load(s)
"""
    assert unsafe_loads(good) == []


def test_no_source_file_unpickles_or_loads_code():
    files = sorted(SRC.rglob("*.py"))
    assert SRC / "ml" / "training" / "checkpoint.py" in files and len(files) >= 20   # the scan sees the package
    found = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(PROJECT_ROOT)))]
    assert found == []


def test_every_torch_load_in_the_package_is_weights_only():
    """The torch.load calls the package makes (checkpoints, model.pt, backbone weights) are all found and safe."""
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        aliases = _aliases(tree)
        calls += [(path.name, _is_const(_keyword(n, "weights_only"), True)) for n in ast.walk(tree)
                  if isinstance(n, ast.Call) and _dotted(n.func, aliases) == "torch.load"]
    assert {name for name, _ in calls} >= {"checkpoint.py", "datasets.py", "inference.py", "backbones.py"}
    assert [name for name, safe in calls if not safe] == []


def _dataset_types(entry: object) -> list[str]:
    """Every ``type`` value at any depth of a catalog entry (wrapped datasets included)."""
    if isinstance(entry, dict):
        own = [entry["type"]] if isinstance(entry.get("type"), str) else []
        return own + [t for v in entry.values() for t in _dataset_types(v)]
    if isinstance(entry, list):
        return [t for v in entry for t in _dataset_types(v)]
    return []


def test_no_catalog_entry_is_a_pickle_dataset():
    assert _dataset_types({"a": {"type": "kedro_mlflow.io.artifacts.MlflowArtifactDataset",
                                 "dataset": {"type": "pickle.PickleDataset"}}})[-1] == "pickle.PickleDataset"
    files = sorted((PROJECT_ROOT / "conf").rglob("catalog*.yml"))
    assert PROJECT_ROOT / "conf" / "base" / "catalog.yml" in files
    types = {t for f in files for t in _dataset_types(yaml.safe_load(f.read_text()) or {})}
    assert "partmatch.datasets.TorchModelDataset" in types          # the scan reads nested entries
    assert sorted(t for t in types if re.search(r"pickle|joblib|cloudpickle|dill", t, re.IGNORECASE)) == []


# ------------------------------------------------------------------------------------------------ servers
SERVER_COMMANDS = {  # the words that start a server -> the click command whose --host default applies
    ("mlflow", "ui"): ("mlflow.cli", "server"), ("mlflow", "server"): ("mlflow.cli", "server"),
    ("mlflow", "models", "serve"): ("mlflow.models.cli", "serve"), ("kedro", "viz"): ("kedro_viz", "run"),
    ("kedro", "mlflow", "ui"): (None, None),
}


def _default_host(module: str | None, command: str | None) -> str:
    if module == "mlflow.cli":
        from mlflow.cli import cli

        cmd = cli.commands[command]
    elif module == "mlflow.models.cli":
        from mlflow.models.cli import commands

        cmd = commands.commands[command]
    elif module == "kedro_viz":
        from kedro_viz.launchers.cli.run import run as cmd
    else:   # kedro-mlflow's ui reads conf/base/mlflow.yml (checked below)
        return yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "mlflow.yml").read_text())["ui"]["host"]
    return next(p.default for p in cmd.params if p.name == "host")


def server_hosts(makefile: str) -> list[tuple[str, str]]:
    """(command, the address it listens on) for every server a Makefile recipe starts."""
    found = []
    for line in makefile.splitlines():
        if not line.startswith("\t"):
            continue
        words = [w.rsplit("/", 1)[-1] if i == 0 or "/" in w else w for i, w in enumerate(
            shlex.split(re.sub(r"\$\([^)]*\)", "X", line.strip()), posix=True))]
        for start in range(len(words)):
            for cmd, (module, name) in sorted(SERVER_COMMANDS.items(), key=lambda kv: -len(kv[0])):
                if tuple(words[start:start + len(cmd)]) != cmd:
                    continue
                rest = words[start + len(cmd):]
                host = next((rest[i + 1] for i, w in enumerate(rest[:-1]) if w in ("-h", "--host")), None)
                host = host or next((w.split("=", 1)[1] for w in rest if w.startswith("--host=")), None)
                found.append((" ".join(cmd), host or _default_host(module, name)))
                break
            else:
                continue
            break
    return found


def test_the_host_scan_reads_explicit_and_default_hosts():
    recipes = ("serve:\n\tX=1 $(BIN)/mlflow models serve -m m -h 0.0.0.0 -p 1\n"
               "ui:\n\t$(BIN)/mlflow ui --backend-store-uri sqlite:///m.db\n"
               "viz:\n\t$(BIN)/kedro viz run --host=10.0.0.1\n")
    assert server_hosts(recipes) == [("mlflow models serve", "0.0.0.0"), ("mlflow ui", "127.0.0.1"),
                                     ("kedro viz", "10.0.0.1")]


def test_every_server_the_makefile_starts_listens_on_localhost():
    hosts = server_hosts((PROJECT_ROOT / "Makefile").read_text())
    assert {cmd for cmd, _ in hosts} >= {"mlflow models serve", "mlflow ui", "kedro viz"}
    assert [(cmd, host) for cmd, host in hosts if host != "127.0.0.1"] == []


def test_mlflow_ui_settings_and_the_package_bind_to_localhost():
    ui = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "mlflow.yml").read_text())["ui"]
    assert ui["host"] == "127.0.0.1"
    wildcard = [f"{p.relative_to(PROJECT_ROOT)}:{n.lineno}" for p in sorted(SRC.rglob("*.py"))
                for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Constant)
                and n.value in ("0.0.0.0", "::", "[::]")]
    assert wildcard == []


# ------------------------------------------------------------------------------------------------ manifest paths
def test_manifest_paths_outside_the_root_are_refused_unless_allowed():
    """The behaviour is tested in tests/pipelines/test_ingestion.py; this pins that the test and the switch exist."""
    from partmatch.config import IngestionParams

    assert IngestionParams().allow_outside_root is False
    text = (PROJECT_ROOT / "tests" / "pipelines" / "test_ingestion.py").read_text()
    for test in ("test_csv_paths_outside_the_source_are_never_read", "test_allow_outside_root_reads_them"):
        assert f"def {test}(" in text, test

