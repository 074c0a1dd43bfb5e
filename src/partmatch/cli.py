"""Project CLI: Kedro's own ``kedro run``, with the project's refusals printed as one message, not a traceback.

Kedro loads ``<package>.cli`` and its ``cli`` group's commands override the built-in ones (``kedro run`` and
``python -m partmatch`` both use this ``run``). A ParameterError (a wrong parameter, an unknown section), a
TrackingStoreError (an unreachable tracking server), a LineageError (a node's inputs come from different runs) or
a SaveError (a version that could not be written -- full disk, read-only folder -- with nothing half-written left)
ends the command with ``Error: <message>`` on stderr and exit status 2; every other error keeps Kedro's traceback.
"""

from __future__ import annotations

import copy
import functools

import click
from kedro.framework.cli.project import run as _kedro_run
from kedro.io import DatasetError

from partmatch.config import ParameterError
from partmatch.datasets import SaveError
from partmatch.hooks import TrackingStoreError
from partmatch.lineage import LineageError

#: Exit status of a run refused before any work (click's usage-error status).
REFUSED_EXIT_CODE = 2


class RunRefused(click.ClickException):
    """Printed by click as ``Error: <message>``, without a traceback."""

    exit_code = REFUSED_EXIT_CODE


def _refusing(callback):
    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except (ParameterError, TrackingStoreError, LineageError) as exc:
            raise RunRefused(str(exc)) from None
        except DatasetError as exc:  # a save that failed (full disk, read-only folder): its message names it all
            cause = exc if isinstance(exc, SaveError) else exc.__cause__
            if isinstance(cause, SaveError):
                raise RunRefused(str(cause)) from None
            raise

    return wrapper


@click.group(name="partmatch")
def cli() -> None:
    """partmatch's project commands."""


run = copy.copy(_kedro_run)
run.callback = _refusing(_kedro_run.callback)
cli.add_command(run, "run")
