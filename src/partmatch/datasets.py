"""Custom Kedro datasets: the raw image source, versioned NumPy arrays and versioned PyTorch models.

``ImageSourceDataset`` is the one place that knows how a raw photo collection is laid out on disk
(a folder tree read through kedro-datasets' ``PartitionedDataset``, or a Kaggle-style CSV manifest);
every node receives an :class:`ImageSource` and reads bytes only through its loaders.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import io
import logging
import os
import posixpath
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from kedro.io.core import (
    AbstractDataset,
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)
from kedro_datasets.json import JSONDataset
from kedro_datasets.partitions import PartitionedDataset
from kedro_mlflow.io.artifacts import (
    MlflowArtifactDataset as _KedroMlflowArtifactDataset,
)

from partmatch.tempfiles import temp_name

logger = logging.getLogger(__name__)

CSV_REQUIRED_COLUMNS = ("filepaths", "labels")
CSV_SPLIT_COLUMN = "data set"
SPLIT_FOLDER_NAMES = {"train", "training", "valid", "validation", "val", "test", "testing"}


@dataclass
class ImageSource:
    """A raw photo collection: one row per file (key, label, split hint) and a lazy byte loader per key.

    ``records`` holds one row per distinct (path, label): a CSV listing a file twice under one label gives one
    row, under two labels two rows with the same path (a labelling conflict the cleaning rules drop).
    ``files`` maps each key to its location on disk, so callers can refuse keys that resolve outside ``root``.
    """

    root: str
    kind: str  # "folder" | "csv"
    records: pd.DataFrame  # columns: path, label, split_hint
    loaders: dict[str, Callable[[], bytes]] = field(repr=False)
    # files that are not photos of a category, each {"path", "reason"} (optional "label", "stage": "quarantine" for
    # a file refused before reading, e.g. a name that is not valid UTF-8); paths and labels always valid UTF-8
    skipped: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict, repr=False)  # key -> path on disk
    source: str = ""  # the source as given (raw_source: a folder or the CSV file); "" = root

    @property
    def given(self) -> str:
        """What the user passed as the source (``--params=raw_source=...``)."""
        return self.source or self.root

    def read_bytes(self, key: str) -> bytes:
        """Return the bytes of one file of the source (the only way nodes open raw photos).

        Raises the underlying ``OSError`` (e.g. ``FileNotFoundError``) rather than Kedro's wrapper, so callers
        can quarantine the file with a precise reason.
        """
        try:
            return self.loaders[key]()
        except DatasetError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError):
                raise cause from None
            raise

    def _real_root(self) -> str:
        # resolved once per (root) -- a realpath per file is measurable on thousands of photos
        if getattr(self, "_real_root_of", None) != self.root:
            self._real_root_of, self._real_root_path = self.root, os.path.realpath(self.root)
        return self._real_root_path

    def outside_root(self, key: str) -> str | None:
        """Where ``key`` really lies when that is outside ``root`` (a ``..`` or absolute manifest path, a symlink
        to a file or folder elsewhere), else None. Symlinks are resolved, so a link inside the folder to a file
        inside it is fine."""
        file = self.files.get(key)
        if file is None:
            return None
        root = self._real_root()
        real = os.path.realpath(file)
        try:
            inside = os.path.commonpath([root, real]) == root
        except ValueError:  # different drives (Windows)
            inside = False
        return None if inside else real


class BytesDataset(AbstractDataset[bytes, bytes]):
    """Reads (and writes) one file as raw bytes; decoding is left to the nodes so bad files can be quarantined."""

    def __init__(self, *, filepath: str, fs_args: dict | None = None, credentials: dict | None = None) -> None:
        protocol, path = get_protocol_and_path(str(filepath))
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol, **(credentials or {}), **(fs_args or {}))
        self._filepath = PurePosixPath(path)

    def load(self) -> bytes:
        with self._fs.open(get_filepath_str(self._filepath, self._protocol), "rb") as f:
            return f.read()

    def save(self, data: bytes) -> None:
        with self._fs.open(get_filepath_str(self._filepath, self._protocol), "wb") as f:
            f.write(data)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "protocol": self._protocol}


def _split_hint(parts: tuple[str, ...]) -> str | None:
    for part in parts[:-2]:
        if part.lower() in SPLIT_FOLDER_NAMES:
            return part.lower()
    return None


class ImageSourceDataset(AbstractDataset[ImageSource, None]):
    """Read-only dataset for a raw photo collection given as a folder tree or a Kaggle-style CSV.

    * Folder: every file below ``path``; the category is the file's parent folder, so both
      ``<CLASS>/img.jpg`` and ``train/<CLASS>/img.jpg`` work. Files directly in ``path`` are skipped.
    * CSV (``path`` ends with ``.csv``): columns ``filepaths`` and ``labels`` (optional ``data set``),
      paths relative to the CSV's folder.

    When ``path`` equals ``demo_path`` and does not exist yet, the deterministic demo catalogue is
    generated there first (never a download).
    """

    def __init__(
        self,
        *,
        path: str,
        demo_path: str | None = None,
        demo_seed: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = str(path)
        self._demo_path = demo_path
        self._demo_seed = demo_seed
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": self._path, "demo_path": self._demo_path}

    def _exists(self) -> bool:
        return Path(self._path).exists()

    def save(self, data: ImageSource) -> None:
        raise DatasetError(f"ImageSourceDataset at '{self._path}' is read-only: raw photos are never overwritten.")

    def load(self) -> ImageSource:
        path = Path(self._path)
        if self._demo_path is not None and not path.exists() and _same_path(path, Path(self._demo_path)):
            from partmatch.demo import ensure_demo_catalogue

            logger.info("Demo catalogue missing at %s: generating it (deterministic, seed %d).", path, self._demo_seed)
            ensure_demo_catalogue(path, seed=self._demo_seed)
        if not path.exists():
            raise DatasetError(
                f"raw_source '{self._path}' does not exist. Pass a folder with one sub-folder per category or a "
                "Kaggle-style CSV: kedro run --params=raw_source=PATH"
            )
        if path.is_file():
            if path.suffix.lower() != ".csv":
                raise DatasetError(
                    f"raw_source '{self._path}' is a file but not a .csv manifest. Pass a folder with one sub-folder "
                    "per category, or a CSV with columns 'filepaths' and 'labels'."
                )
            source = self._load_csv(path)
        else:
            source = self._load_folder(path)
        source.source = self._path
        if source.records.empty:
            raise DatasetError(
                f"raw_source '{self._path}' contains no image files in category folders. Expected "
                "'<CATEGORY>/<photo>.jpg' (or 'train/<CATEGORY>/<photo>.jpg') below it, or a CSV manifest."
            )
        logger.info("Image source %s (%s): %d files, %d categories.", path, source.kind, len(source.records),
                    source.records["label"].nunique())
        return source

    def _load_folder(self, path: Path) -> ImageSource:
        # PartitionedDataset lists the files (its own rules: fsspec find, partition ids); one BytesDataset per
        # file, as its load() builds them, cost ~60 us each in Kedro's dataset set-up -- serial work in front of
        # the ingestion pool -- so each partition reads its local file directly instead (same bytes, same errors).
        listing = PartitionedDataset(path=str(path), dataset={"type": f"{__name__}.BytesDataset"},
                                     filename_suffix="")
        listing._invalidate_caches()
        partitions = {listing._path_to_partition(file): functools.partial(_read_file, file)
                      for file in listing._list_partitions()}
        rows, loaders, skipped, files, hidden = [], {}, [], {}, {}
        for key in sorted(partitions):
            parts = PurePosixPath(key).parts
            first_hidden = next((i for i, p in enumerate(parts) if p.startswith(".")), None)
            if first_hidden is not None:  # one report entry per hidden file or hidden folder (e.g. .git)
                top = printable("/".join(parts[: first_hidden + 1]))
                hidden.setdefault(top, [first_hidden == len(parts) - 1, 0])[1] += 1
                continue
            if len(parts) < 2:
                link = os.path.join(str(path), key)
                reason = ("file directly in the source folder, not in a category folder" if not os.path.islink(link)
                          else f"symbolic link directly in the source folder (to {printable(os.path.realpath(link))}), "
                          "not followed")
                skipped.append({"path": printable(key), "reason": reason})
                continue
            if not _is_utf8(key):
                skipped.append({"path": printable(key), "label": printable(parts[-2]), "stage": "quarantine",
                                "reason": _NOT_UTF8.format(printable(key))})
                continue
            rows.append({"path": key, "label": parts[-2], "split_hint": _split_hint(parts)})
            loaders[key] = partitions[key]
            files[key] = os.path.join(str(path), key)
        for top, (is_file, n) in hidden.items():
            what = "hidden file" if is_file else f"hidden folder ({n} file(s))"
            skipped.append({"path": top, "reason": f"{what}: name starts with '.', not read"})
        records = pd.DataFrame(rows, columns=["path", "label", "split_hint"])
        return ImageSource(root=str(path), kind="folder", records=records, loaders=loaders, skipped=skipped,
                           files=files)

    def _load_csv(self, path: Path) -> ImageSource:
        try:
            table = pd.read_csv(path, sep=_sniff_separator(path), dtype=object, keep_default_na=False,
                                encoding="utf-8-sig", encoding_errors="surrogateescape")
        except Exception as exc:
            raise DatasetError(f"Cannot read CSV manifest '{path}': {exc}") from exc
        table.columns = [str(c).strip() for c in table.columns]
        missing = [c for c in CSV_REQUIRED_COLUMNS if c not in table.columns]
        if missing:
            raise DatasetError(
                f"CSV manifest '{path}' lacks column(s) {missing}; found {list(table.columns)}. A Kaggle-style "
                "manifest needs 'filepaths' (relative to the CSV's folder) and 'labels' (optional 'data set')."
            )
        base = path.parent
        hints = table[CSV_SPLIT_COLUMN] if CSV_SPLIT_COLUMN in table.columns else [""] * len(table)
        # One row per (file, label) before anything is read: 100,000 rows naming one file are one photo, and one
        # file under two labels stays two rows (a conflict that cleaning drops, never a silent keep-one).
        rows: dict[tuple[str, str], dict] = {}
        skipped: dict[tuple[str, str], dict] = {}
        for rel, label, hint in zip(table["filepaths"], table["labels"], hints, strict=True):
            rel, label = _normalise_rel(str(rel).strip()), str(label).strip()
            if (rel, label) in rows or (rel, label) in skipped:
                continue
            if not (_is_utf8(rel) and _is_utf8(label)):
                skipped[(rel, label)] = {"path": printable(rel), "label": printable(label), "stage": "quarantine",
                                         "reason": _NOT_UTF8.format(printable(rel))}
                continue
            hint = printable(hint).strip().lower()
            rows[(rel, label)] = {"path": rel, "label": label, "split_hint": hint or None}
        n_rows = len(table)
        if len(rows) + len(skipped) < n_rows:
            logger.info("CSV manifest %s: %d row(s) repeat a file already listed under the same label (read once).",
                        path, n_rows - len(rows) - len(skipped))
        records = pd.DataFrame(list(rows.values()), columns=["path", "label", "split_hint"])
        files = {key: os.path.join(str(base), key) for key in records["path"].unique()}
        loaders = {key: functools.partial(_read_file, file) for key, file in files.items()}
        return ImageSource(root=str(base), kind="csv", records=records, loaders=loaders,
                           skipped=list(skipped.values()), files=files)


_NOT_UTF8 = "file or folder name is not valid UTF-8 (undecodable bytes shown as \\x..): '{}'"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: Any) -> str:
    """``text`` as valid UTF-8: a file name with undecodable bytes (kept by Python as surrogates) shows them as
    ``\\xff`` escapes, so reports, Parquet and CSV can always be written and still name the file."""
    s = str(text)
    if _is_utf8(s):
        return s
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _sniff_separator(path: Path) -> str:
    """The CSV's separator: the first of , ; tab | whose split header names every required column."""
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            header = f.readline()
    except OSError:
        return ","
    for sep in (",", ";", "\t", "|"):
        columns = {c.strip() for c in next(csv.reader([header], delimiter=sep), [])}
        if all(c in columns for c in CSV_REQUIRED_COLUMNS):
            return sep
    return ","


def _normalise_rel(rel: str) -> str:
    """A manifest path in one spelling ('./a/b.jpg', 'a//b.jpg' -> 'a/b.jpg'); '..' is kept (refused later)."""
    return posixpath.normpath(rel) if rel else rel


def _read_file(file: str) -> bytes:
    with open(file, "rb") as f:
        return f.read()


def _same_path(a: Path, b: Path) -> bool:
    return os.path.normpath(a.absolute()) == os.path.normpath(b.absolute())


# ------------------------------------------------------------------------------------ atomic saves

class SaveError(DatasetError):
    """A dataset could not be written (full disk, read-only folder...): the message names the dataset and the
    path; nothing half-written was left behind."""


class _AtomicFile:
    """A file open for writing under a temporary name: closed without an error it replaces its target in one
    ``os.replace``; an error inside ``with`` (or while closing) deletes it, so no half-written target exists."""

    def __init__(self, inner: Any, temp: str, target: str, dataset: str, created: str | None) -> None:
        self._inner, self._temp, self._target = inner, temp, target
        self._dataset, self._created, self._done = dataset, created, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __iter__(self):
        return iter(self._inner)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
            return False
        self.abort()
        if isinstance(exc, OSError):
            raise save_error(self._dataset, self._target, exc) from exc
        return False

    @property
    def closed(self) -> bool:
        return self._done or self._inner.closed

    def close(self) -> None:
        if self._done:
            return
        try:
            self._inner.flush()
            with contextlib.suppress(AttributeError, OSError, ValueError):
                os.fsync(self._inner.fileno())  # the bytes are on disk before the name says they are complete
            self._inner.close()
            os.replace(self._temp, self._target)
        except OSError as exc:
            self.abort()
            raise save_error(self._dataset, self._target, exc) from exc
        self._done = True

    def abort(self) -> None:
        """Delete the temporary file (and the version folder this save created, when left empty)."""
        self._done = True
        with contextlib.suppress(Exception):
            self._inner.close()
        with contextlib.suppress(OSError):
            os.remove(self._temp)
        remove_empty_folders(self._created, os.path.dirname(self._target))


def remove_empty_folders(top: str | None, folder: str) -> None:
    """Remove ``folder`` and its parents up to ``top`` (included) while they are empty."""
    if top is None:
        return
    top, folder = os.path.normpath(top), os.path.normpath(folder)
    while True:
        try:
            os.rmdir(folder)
        except OSError:
            return
        if folder == top or len(folder) <= len(top):
            return
        folder = os.path.dirname(folder)


def save_error(dataset: str, target: str, exc: OSError) -> SaveError:
    """The error of a failed write, naming the dataset, the path and what to do."""
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0, "")
    if exc.errno == errno.ENOSPC:
        fix = "Free disk space on that file system (or point the catalog's data/ elsewhere), then re-run."
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "Make that folder writable (or point the catalog's data/ elsewhere), then re-run."
    else:
        fix = "Fix the cause, then re-run."
    return SaveError(
        f"Cannot save dataset '{dataset}' to {target}: {reason}{f' ({code})' if code else ''}. Nothing of this "
        f"version was kept (the partly written file was removed), so the latest complete version is unchanged. "
        f"{fix}"
    )


class AtomicSavesFileSystem:
    """An fsspec file system whose ``open(path, "w"/"wb"...)`` on the local disk writes ``path`` atomically (see
    :class:`_AtomicFile`); reads and every other call go to the wrapped file system unchanged. Other protocols
    are passed through: object stores publish an object only when its upload completes."""

    def __init__(self, fs: Any, dataset: str) -> None:
        self._fs, self._dataset = fs, dataset

    @classmethod
    def wrap(cls, fs: Any, dataset: str) -> Any:
        if isinstance(fs, cls):
            return fs
        return cls(fs, dataset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    def __getstate__(self) -> dict:
        return {"fs": self._fs, "dataset": self._dataset}

    def __setstate__(self, state: dict) -> None:
        self._fs, self._dataset = state["fs"], state["dataset"]

    def _is_local(self) -> bool:
        protocol = getattr(self._fs, "protocol", "")
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return "file" in protocols or "local" in protocols

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if not any(c in mode for c in "wx") or "+" in mode or not self._is_local():  # reads, appends: unchanged
            return self._fs.open(path, mode, **kwargs)
        target = os.path.abspath(self._fs._strip_protocol(path) if hasattr(self._fs, "_strip_protocol") else path)
        folder = os.path.dirname(target)
        created = _first_missing(folder)
        temp = os.path.join(folder, temp_name(os.path.basename(target)))
        try:
            os.makedirs(folder, exist_ok=True)
            inner = self._fs.open(temp, mode.replace("x", "w"), **kwargs)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(temp)
            remove_empty_folders(created, folder)
            raise save_error(self._dataset, target, exc) from exc
        return _AtomicFile(inner, temp, target, self._dataset, created)


def _first_missing(folder: str) -> str | None:
    """The top-most missing folder on the way to ``folder`` (what ``makedirs`` would create), else None."""
    missing = None
    current = os.path.normpath(folder)
    while not os.path.exists(current):
        missing = current
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return missing


def make_saves_atomic(dataset: Any, name: str) -> bool:
    """Make every local file ``dataset`` saves appear complete or not at all (kedro-datasets' CSV, Parquet, JSON,
    text and matplotlib datasets write in place through ``self._fs.open``; they get :class:`AtomicSavesFileSystem`
    instead). Returns whether the dataset was changed."""
    fs = getattr(dataset, "_fs", None)
    if fs is None or isinstance(fs, AtomicSavesFileSystem) or not hasattr(fs, "open"):
        return False
    dataset._fs = AtomicSavesFileSystem(fs, name)
    return True


class _VersionedBinaryDataset(AbstractVersionedDataset[Any, Any]):
    """Shared plumbing for versioned single-file binary datasets (fsspec, versioning, exists)."""

    def __init__(
        self,
        *,
        filepath: str,
        version: Version | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        _fs_args = deepcopy(fs_args) or {}
        protocol, path = get_protocol_and_path(str(filepath), version)
        self._protocol = protocol
        if protocol == "file":
            _fs_args.setdefault("auto_mkdir", True)
        self._fs = fsspec.filesystem(protocol, **(credentials or {}), **_fs_args)
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path), version=version, exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def _describe(self) -> dict[str, Any]:
        return {"filepath": self._filepath, "protocol": self._protocol, "version": self._version}

    def _decode(self, raw: bytes) -> Any:
        raise NotImplementedError

    def _encode(self, data: Any) -> bytes:
        raise NotImplementedError

    def load(self) -> Any:
        load_path = get_filepath_str(self._get_load_path(), self._protocol)
        with self._fs.open(load_path, "rb") as f:
            return self._decode(f.read())

    def save(self, data: Any) -> None:
        payload = self._encode(data)  # encode first: a failing encode never leaves a half-written file
        save_path = get_filepath_str(self._get_save_path(), self._protocol)
        # a temporary name beside the version, renamed when complete: a save cut short is never the latest
        with AtomicSavesFileSystem.wrap(self._fs, self._filepath.name).open(save_path, "wb") as f:
            f.write(payload)
        self._fs.invalidate_cache(get_filepath_str(self._filepath, self._protocol))

    def _exists(self) -> bool:
        try:
            load_path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.exists(load_path)


class NpyDataset(_VersionedBinaryDataset):
    """Versioned NumPy array stored as ``.npy`` (no pickle), e.g. the decoded uint8 image tensor.

    ``load_args: {mmap_mode: r}`` loads a local file as a read-only ``numpy.memmap`` (nothing read until used).
    A ``numpy.memmap`` over a whole ``.npy`` file (``np.lib.format.open_memmap``) is saved straight from its
    mapping, never copied into memory.
    """

    def __init__(self, *, filepath: str, version: Version | None = None, credentials: dict[str, Any] | None = None,
                 fs_args: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None,
                 load_args: dict[str, Any] | None = None) -> None:
        super().__init__(filepath=filepath, version=version, credentials=credentials, fs_args=fs_args,
                         metadata=metadata)
        self._load_args = dict(load_args or {})
        unknown = set(self._load_args) - {"mmap_mode"}
        if unknown:
            raise DatasetError(f"NpyDataset '{filepath}': unknown load_args {sorted(unknown)} (only mmap_mode)")

    def load(self) -> np.ndarray:
        mmap_mode = self._load_args.get("mmap_mode")
        if mmap_mode and self._protocol == "file":
            return np.load(get_filepath_str(self._get_load_path(), self._protocol), mmap_mode=mmap_mode,
                           allow_pickle=False)
        return super().load()

    def _decode(self, raw: bytes) -> np.ndarray:
        return np.load(io.BytesIO(raw), allow_pickle=False)

    def _encode(self, data: np.ndarray) -> bytes | memoryview:
        whole = _npy_file_view(data)
        if whole is not None:
            return whole
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(data), allow_pickle=False)
        return buf.getvalue()


def _npy_file_view(data: Any) -> memoryview | None:
    """The bytes of the ``.npy`` file behind ``data`` when ``data`` is exactly that file's array, else None."""
    import mmap

    if not isinstance(data, np.memmap) or not isinstance(getattr(data, "base", None), mmap.mmap) \
            or not data.flags.c_contiguous or not isinstance(data.filename, str):
        return None
    try:
        if hasattr(data, "flush"):
            data.flush()
        with open(data.filename, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return None
            shape, fortran, dtype = read_header(f)
            header_len = f.tell()
        size = os.path.getsize(data.filename)
    except (OSError, ValueError):
        return None
    if (tuple(shape) != data.shape or fortran or dtype != data.dtype or data.offset != header_len
            or size != header_len + data.nbytes or len(data.base) != size):
        return None
    return memoryview(data.base)


class TorchModelDataset(_VersionedBinaryDataset):
    """Versioned PyTorch checkpoint ``{"spec": ..., "state_dict": ..., ...}`` loaded with ``weights_only=True``."""

    def _decode(self, raw: bytes) -> dict:
        import torch

        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)

    def _encode(self, data: dict) -> bytes:
        import torch

        buf = io.BytesIO()
        torch.save(data, buf)
        return buf.getvalue()


class GalleryIndexDataset(_VersionedBinaryDataset):
    """Versioned search index (``partmatch.ml.retrieval.GalleryIndex``) in its own single-file format (no pickle):
    vectors, part names, ids and per-vector metadata (path, content hash)."""

    def _decode(self, raw: bytes) -> Any:
        from partmatch.ml.retrieval import GalleryIndex

        return GalleryIndex.from_bytes(raw)

    def _encode(self, data: Any) -> bytes:
        return data.to_bytes()


class MlflowArtifactDataset(_KedroMlflowArtifactDataset):
    """kedro-mlflow's ``MlflowArtifactDataset`` that shares the catalog's save version with the wrapped dataset.

    kedro-mlflow 2.0.3 builds the wrapped dataset without the catalog's save version, so each wrapped
    versioned dataset would stamp its own timestamp when Kedro 1.x materialises it lazily, and the catalog
    refuses the mismatch (``VersionAlreadyExistsError``). Declaring ``versioned = True`` makes Kedro pass
    its ``Version(load, save)``; it is handed to the inner dataset when that one is versioned.
    """

    versioned = True

    def __new__(cls, dataset: str | dict, run_id: str | None = None, artifact_path: str | None = None,
                credentials: dict | None = None, metadata: dict | None = None, version: Version | None = None):
        instance = _KedroMlflowArtifactDataset(dataset=dataset, run_id=run_id, artifact_path=artifact_path,
                                               credentials=credentials, metadata=metadata)
        if version is not None and isinstance(instance, AbstractVersionedDataset) and instance._version is not None:
            instance._version = version
        return instance


class OptionalNpyDataset(NpyDataset):
    """:class:`NpyDataset` whose load gives ``None`` when no version exists yet: ``decoded_images`` (ingestion's
    one decode), which preprocessing uses when it is there and replaces by decoding when it is not (data ingested
    before it existed, or its folder deleted to save disk)."""

    def load(self) -> Any:
        if not self._exists():
            return None
        return super().load()


class MetricsJSONDataset(JSONDataset):
    """Versioned JSON whose load gives ``None`` when no version exists yet (a model that was never trained)."""

    def load(self) -> Any:
        if not self._exists():
            return None
        return super().load()
