"""kedro run's refusals: the project's own errors end the command with their message alone (exit status 2)."""

from __future__ import annotations

import pytest
from kedro.io import DatasetError

from partmatch.cli import REFUSED_EXIT_CODE, RunRefused, _refusing
from partmatch.config import ParameterError
from partmatch.datasets import SaveError
from partmatch.lineage import LineageError


def _raising(exc: BaseException):
    def callback():
        raise exc
    return _refusing(callback)


@pytest.mark.parametrize("exc", [ParameterError("split.seed: not a number"), LineageError("inputs disagree"),
                                 SaveError("Cannot save dataset 'x' to /d/x.csv: No space left on device")])
def test_project_errors_are_refusals_with_their_message(exc):
    with pytest.raises(RunRefused) as err:
        _raising(exc)()
    assert err.value.message == str(exc) and err.value.exit_code == REFUSED_EXIT_CODE == 2


def test_a_failed_save_wrapped_by_kedro_is_a_refusal_naming_the_dataset():
    cause = SaveError("Cannot save dataset 'clean_manifest' to /p/data/03_primary/clean_manifest.parquet: "
                      "Read-only file system (EROFS)")
    wrapped = DatasetError("Failed while saving data to dataset ParquetDataset(...)")
    wrapped.__cause__ = cause
    with pytest.raises(RunRefused) as err:
        _raising(wrapped)()
    assert err.value.message == str(cause)


def test_other_dataset_errors_keep_their_traceback():
    other = DatasetError("Failed while loading data from dataset")
    other.__cause__ = KeyError("x")
    with pytest.raises(DatasetError) as err:
        _raising(other)()
    assert err.value is other
