"""One-line command-line errors and their exit codes."""

import errno
import warnings

import pytest

from dnq_landscape_common.cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    OneLineParser,
    debug_requested,
    guarded,
    one_line,
)
from dnq_landscape_common.errors import NonFiniteError


def _raise(e):
    def fn():
        raise e
    return fn


@pytest.mark.parametrize("error, text", [
    (ValueError("epochs must be >= 1\nsecond line"), "demo: error: epochs must be >= 1"),
    (NonFiniteError("loss is NaN at step 3"), "demo: error: loss is NaN at step 3"),
    (RuntimeError("CUDA out of memory"), "demo: error: CUDA out of memory (--debug shows the traceback)"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x/model.pt"),
     "demo: error: FileNotFoundError: runs/x/model.pt: No such file or directory (check the path and its "
     "permissions)"),
])
def test_expected_errors_are_one_line_and_exit_code_2(error, text, capsys):
    assert guarded("demo", _raise(error)) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.splitlines() == [text]
    with pytest.raises(type(error)):  # --debug: the traceback
        guarded("demo", _raise(error), debug=True)


def test_interrupt_bug_usage_and_success(capsys):
    assert guarded("demo", _raise(KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(KeyError):  # not a user's error: a bug keeps its traceback
        guarded("demo", _raise(KeyError("x")))
    p = OneLineParser(prog="demo run")
    p.add_argument("--n", type=int)
    assert guarded("demo run", lambda: p.parse_args(["--n", "two"]) and EXIT_OK) == EXIT_ERROR
    assert capsys.readouterr().err.strip() == "demo run: error: argument --n: invalid int value: 'two' " \
                                              "(see demo run --help)"
    assert guarded("demo", lambda: EXIT_OK) == EXIT_OK


def test_warnings_print_as_one_line(capsys):
    def warn():
        warnings.warn("the budget\n  is low", UserWarning, stacklevel=1)
        return EXIT_OK

    assert guarded("demo", warn) == EXIT_OK
    assert capsys.readouterr().err.splitlines() == ["demo: warning: the budget is low"]


def test_debug_is_asked_for_by_flag_or_by_the_commands_environment_variable(monkeypatch):
    monkeypatch.delenv("DNQ_DEBUG", raising=False)
    monkeypatch.delenv("LANDSCAPE_DEBUG", raising=False)
    assert debug_requested(["train", "--debug"]) and not debug_requested(["train"])
    monkeypatch.setenv("LANDSCAPE_DEBUG", "1")
    assert debug_requested([], "LANDSCAPE_DEBUG") and not debug_requested([], "DNQ_DEBUG")
    monkeypatch.setenv("LANDSCAPE_DEBUG", "0")
    assert not debug_requested([], "LANDSCAPE_DEBUG")
    assert one_line(OSError("plain")) == "plain"  # no errno: the message as it is
