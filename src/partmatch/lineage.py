"""Lineage of versioned datasets: which versions of which datasets each saved version was derived from.

Kedro loads the latest version of every versioned input independently, so a ``split_index`` from one run and an
``image_array`` from another (or embeddings of another model version) would meet in a node and be used silently
on misaligned rows. :class:`LineageHook` prevents that:

* after a node runs, every versioned output gets a record ``data/lineage/<dataset>/<version>.json``: the content
  digest of the output, and the version + digest of every versioned dataset it was derived from (its inputs, their
  own ancestors, and the node's other outputs, which were made together with it);
* before a node runs, the records of its versioned inputs must agree on every dataset they share: the same
  version, or at least the same content. Otherwise the run stops before the node with :class:`LineageError`,
  naming both inputs, their versions and the dataset they disagree on, and how to fix it.

Inputs without a record (saved before lineage existed, or not versioned) are not checked. Records are small JSON
files written atomically next to nothing else; deleting ``data/lineage`` only switches the check off for the
versions saved so far.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.framework.hooks import hook_impl
from kedro.io import AbstractVersionedDataset

logger = logging.getLogger(__name__)

LINEAGE_DIR = Path("data") / "lineage"


class LineageError(RuntimeError):
    """Two inputs of a node were derived from different versions of the same dataset."""


def content_digest(data: Any) -> str | None:
    """A sha256 of a dataset's content, for the types whose content is cheap to hash exactly; else None (also
    for content those types cannot hash: list cells in a frame, a circular dict...)."""
    try:
        return _digest(data)
    except (TypeError, ValueError):
        return None


def _digest(data: Any) -> str | None:
    h = hashlib.sha256()
    if isinstance(data, np.ndarray):
        h.update(f"{data.dtype.str}{data.shape}".encode())
        h.update(memoryview(np.ascontiguousarray(data)).cast("B"))
    elif isinstance(data, pd.DataFrame):
        h.update(",".join(map(str, data.columns)).encode())
        h.update(pd.util.hash_pandas_object(data, index=True).to_numpy().tobytes())
    elif isinstance(data, (dict, list)):
        h.update(json.dumps(data, sort_keys=True, default=_no_json).encode())
    else:
        return None
    return h.hexdigest()


def _no_json(obj: Any) -> Any:
    raise TypeError(type(obj).__name__)


def _same(a: dict, b: dict) -> bool:
    if a.get("version") == b.get("version"):
        return True
    return a.get("digest") is not None and a.get("digest") == b.get("digest")


def _with_self(name: str, record: dict) -> dict[str, dict]:
    return {**record["lineage"], name: {"version": record["version"], "digest": record.get("digest")}}


def find_conflict(records: dict[str, dict]) -> str | None:
    """The first disagreement between the lineage of several inputs ({input name: record}), as a message."""
    names = sorted(records)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = _with_self(first, records[first]), _with_self(second, records[second])
            for common in sorted(set(a) & set(b)):
                if not _same(a[common], b[common]):
                    if common in (first, second):
                        this, other = (first, second) if common == first else (second, first)
                        derived = (b if common == first else a)[common]["version"]
                        return (f"'{other}' (version {records[other]['version']}) was derived from {this} version "
                                f"{derived}, but {this} version {records[this]['version']} was loaded: they come "
                                "from different runs and do not belong together")
                    return (f"'{first}' (version {records[first]['version']}) was derived from {common} version "
                            f"{a[common]['version']}, but '{second}' (version {records[second]['version']}) from "
                            f"{common} version {b[common]['version']}: they come from different runs and do not "
                            "belong together")
    return None


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LineageHook:
    """Writes a lineage record for every versioned output; refuses a node whose inputs' lineages disagree."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self._memory: dict[str, dict] = {}  # lineage of this run's non-versioned outputs (MemoryDatasets)
        self._pending: dict[str, dict] = {}  # records of outputs computed but not saved yet

    @hook_impl
    def after_context_created(self, context) -> None:
        self._root = Path(context.project_path) / LINEAGE_DIR
        self._memory, self._pending = {}, {}

    @staticmethod
    def _versioned(catalog, name: str) -> AbstractVersionedDataset | None:
        try:
            dataset = catalog.get(name)
        except Exception:  # noqa: BLE001 - a name the catalog cannot resolve has no lineage
            return None
        return dataset if isinstance(dataset, AbstractVersionedDataset) else None

    def _record_path(self, name: str, version: str) -> Path:
        return self._root / name / f"{version}.json"

    def _input_record(self, catalog, name: str) -> dict | None:
        if name in self._memory:
            return self._memory[name]
        dataset = self._versioned(catalog, name)
        if dataset is None or self._root is None:
            return None
        try:
            version = dataset.resolve_load_version()
        except Exception:  # noqa: BLE001 - no version saved yet: Kedro reports that itself on load
            return None
        path = self._record_path(name, version)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("lineage record %s unreadable (%s): %s not checked", path, exc, name)
            return None

    def _records(self, node, catalog) -> dict[str, dict]:
        records = {}
        for name in node.inputs:
            if name.startswith("params:") or name == "parameters":
                continue
            record = self._input_record(catalog, name)
            if record is not None:
                records[name] = record
        return records

    @hook_impl
    def before_node_run(self, node, catalog) -> None:
        if self._root is None:
            return
        conflict = find_conflict(self._records(node, catalog))
        if conflict:
            raise LineageError(
                f"Node '{node.name}': {conflict}. Re-run the pipeline that makes them together (e.g. `kedro run "
                f"--from-nodes {node.name}` after re-running the upstream pipeline, or the whole `kedro run`), or "
                "load matching versions with --load-versions=DATASET:VERSION. Lineage records: "
                f"{self._root}.")

    @hook_impl
    def after_node_run(self, node, catalog, outputs: dict[str, Any]) -> None:
        if self._root is None:
            return
        inherited: dict[str, dict] = {}
        for name, record in self._records(node, catalog).items():
            inherited.update(record["lineage"])
            inherited[name] = {"version": record["version"], "digest": record.get("digest")}
        made: dict[str, dict] = {}
        for name, data in outputs.items():
            dataset = self._versioned(catalog, name)
            version = dataset.resolve_save_version() if dataset is not None else None
            made[name] = {"version": version or "memory", "digest": content_digest(data),
                          "versioned": dataset is not None}
        for name, entry in made.items():
            siblings = {n: {"version": e["version"], "digest": e["digest"]} for n, e in made.items()
                        if n != name and e["versioned"]}
            record = {"dataset": name, "version": entry["version"], "digest": entry["digest"], "node": node.name,
                      "lineage": {**inherited, **siblings}}
            if entry["versioned"]:
                self._pending[name] = record  # written once the dataset is saved (Kedro saves after this hook)
            else:
                self._memory[name] = record

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        record = self._pending.pop(dataset_name, None)
        if record is None or self._root is None:
            return
        try:
            _write_json(self._record_path(dataset_name, record["version"]), record)
        except OSError as exc:
            logger.warning("lineage record for %s not written (%s)", dataset_name, exc)

    @hook_impl
    def on_node_error(self, node) -> None:
        for name in node.outputs:  # a save that failed: no record of a version that does not exist
            self._pending.pop(name, None)
