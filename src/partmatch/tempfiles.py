"""Names of files being written: ``.<name>.tmp-<host>-<pid>-<random>`` beside their target until complete.

One naming for every partial file the project writes (dataset versions, training checkpoints), so whoever finds
one can tell whose it is: a later run removes those of its own host whose process is gone, never another
host's (a shared folder). No Kedro import: the training engine uses it too.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

TEMP_MARK = ".tmp-"


def temp_host() -> str:
    """This host as temp names carry it (``-`` is the field separator, so it becomes ``_``)."""
    return socket.gethostname().replace("-", "_") or "localhost"


def temp_name(name: str) -> str:
    """The hidden temporary name a file is written under before it is renamed to ``name``."""
    return f".{name}{TEMP_MARK}{temp_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """``(target name, host, pid)`` of a file named by :func:`temp_name`, else None."""
    if not name.startswith(".") or TEMP_MARK not in name:
        return None
    target, _, rest = name[1:].rpartition(TEMP_MARK)
    parts = rest.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return target, parts[0], int(parts[1])


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` written to ``path`` under a :func:`temp_name` beside it, then renamed (parent folders created): a
    write cut short leaves the previous file intact and no partial file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
