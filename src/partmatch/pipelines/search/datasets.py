"""Datasets of the search pipelines: the query photos (read raw, a folder or one file) and a source of new parts.

Kept beside the search pipelines because only they read them; both render their deterministic demo folder
(:mod:`partmatch.demo`) when pointed at it and it is missing, never a download.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import DatasetError, VersionNotFoundError

from partmatch.datasets import (
    GalleryIndexDataset,
    ImageSource,
    ImageSourceDataset,
    TorchModelDataset,
    _same_path,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryPhoto:
    """One file to identify: its name under the query root, absolute path, true part name when its folder says it."""

    name: str
    file: str
    true_label: str | None
    read: Callable[[], bytes] = field(repr=False, compare=False)


@dataclass(frozen=True)
class QueryPhotos:
    """Every file under a query path, in name order (nothing decoded yet: a bad file is an answer, not a crash)."""

    root: str
    photos: list[QueryPhoto]

    def __len__(self) -> int:
        return len(self.photos)


def _reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


class QueryPhotosDataset(ImageSourceDataset):
    """Read-only: a single photo, or every file below a folder (hidden files skipped).

    A file inside a sub-folder has that folder's name as its true part name (``queries/Brake Disc/x.jpg``), so
    the report can mark wrong answers; files at the top level and a single file have none. When ``path`` equals
    ``demo_path`` and is missing, the demo query photos are rendered there first.
    """

    def load(self) -> QueryPhotos:
        path = Path(self._path)
        if self._demo_path is not None and not path.exists() and _same_path(path, Path(self._demo_path)):
            from partmatch.demo import ensure_demo_queries

            logger.info("Demo query photos missing at %s: rendering them (deterministic).", path)
            ensure_demo_queries(path, seed=self._demo_seed)
        if not path.exists():
            raise DatasetError(f"search.query '{self._path}' does not exist. Pass a photo or a folder of photos: "
                               "kedro run --pipeline=search --params=search.query=PATH")
        if path.is_file():
            return QueryPhotos(root=str(path.parent.absolute()),
                               photos=[QueryPhoto(path.name, str(path.absolute()), None, _reader(path))])
        photos = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = PurePosixPath(file.relative_to(path).as_posix())
            if any(part.startswith(".") for part in rel.parts):
                continue
            photos.append(QueryPhoto(str(rel), str(file.absolute()), rel.parts[-2] if len(rel.parts) > 1 else None,
                                     _reader(file)))
        if not photos:
            raise DatasetError(f"search.query '{self._path}' is a folder without any file. Put the photos to "
                               "identify in it (a sub-folder named after the part marks the right answer).")
        logger.info("Query photos %s: %d file(s).", path, len(photos))
        return QueryPhotos(root=str(path.absolute()), photos=photos)


class NewPartsSourceDataset(ImageSourceDataset):
    """The photos ``search_add`` adds (folder of part sub-folders or CSV, like ``raw_source``).

    Its demo folder holds a part line absent from the demo catalogue (:data:`partmatch.demo.NEW_PART`),
    rendered when missing.
    """

    def load(self) -> ImageSource:
        path = Path(self._path)
        if self._demo_path is not None and not path.exists() and _same_path(path, Path(self._demo_path)):
            from partmatch.demo import ensure_demo_new_parts

            logger.info("Demo new part line missing at %s: rendering it (deterministic).", path)
            ensure_demo_new_parts(path, seed=self._demo_seed)
        if not path.exists():
            raise DatasetError(f"search.add '{self._path}' does not exist. Pass the new photos as a folder with one "
                               "sub-folder per part name, or a CSV manifest: kedro run --pipeline=search_add "
                               "--params=search.add=PATH")
        return ImageSourceDataset(path=self._path).load()


class _SaysWhatToRun:
    """Mixin for a versioned dataset: loading before any version exists raises an error naming the command."""

    _what = "version"

    def _fix(self) -> str:
        raise NotImplementedError

    def load(self) -> Any:
        try:
            return super().load()  # type: ignore[misc]
        except VersionNotFoundError:
            where = self._filepath  # type: ignore[attr-defined]
            raise DatasetError(f"No {self._what} yet at {where}: {self._fix()}") from None


class SearchModelDataset(_SaysWhatToRun, TorchModelDataset):
    """``data/06_models/<search.model>/model.pt``; a model never trained is a clear error naming the command."""

    _what = "trained model"

    def _fix(self) -> str:
        model = PurePosixPath(self._filepath).parent.name
        return (f"train it first: kedro run --pipeline={model} (or kedro run), or pick a trained model with "
                "--params=search.model=NAME")


class CatalogueIndexDataset(_SaysWhatToRun, GalleryIndexDataset):
    """The versioned catalogue index; none built yet is a clear error naming the command."""

    _what = "catalogue index"

    def _fix(self) -> str:
        return ("build it first: kedro run --pipeline=search_index (or kedro run), optionally "
                "--params=search.catalog=PATH")
