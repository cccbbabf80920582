"""One-line command-line errors, shared by the ``dnq`` and ``landscape`` commands.

Every error a user can cause is one line on stderr, ``<command>: error: ...``, and exit code 2;
Ctrl-C exits with 130; ``--debug`` (or the command's environment variable) keeps the traceback.
Warnings print as one line each.

Example:
    >>> from dnq_landscape_common.cli import EXIT_ERROR, EXIT_OK, OneLineParser, guarded
    >>> def fails():
    ...     raise ValueError("epochs must be >= 1, got 0")
    >>> import sys; saved, sys.stderr = sys.stderr, sys.stdout  # show stderr here
    >>> guarded("demo run", fails) == EXIT_ERROR
    demo run: error: epochs must be >= 1, got 0
    True
    >>> guarded("demo run", lambda: EXIT_OK)
    0
    >>> p = OneLineParser(prog="demo")
    >>> _ = p.add_argument("--n", type=int)
    >>> guarded("demo", lambda: p.parse_args(["--n", "x"]))
    demo: error: argument --n: invalid int value: 'x' (see demo --help)
    2
    >>> sys.stderr = saved
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

from .errors import NonFiniteError

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "OneLineParser", "UsageError", "debug_requested",
           "first_line", "guarded", "one_line", "one_line_warnings"]

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130

# every error class a user can cause; anything else is a bug and keeps its traceback. The
# packages' own (configuration, data, lock, study errors) are ValueErrors; non-finite ones
# subclass NonFiniteError.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, NonFiniteError, RuntimeError,
                                                    json.JSONDecodeError)


class UsageError(Exception):
    """A command line that does not parse (the message is argparse's, the prog names the command)."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) and raise
    :class:`UsageError` instead of exiting, so that :func:`guarded` returns exit code 2."""

    def error(self, message: str):
        raise UsageError(self.prog, f"{message} (see {self.prog} --help)")


def debug_requested(argv: list[str] | None = None, env: str = "DNQ_DEBUG") -> bool:
    """Whether ``--debug`` is on the command line or the environment variable ``env`` is set
    (and not ``0``)."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(env, "") not in ("", "0")


def first_line(e: BaseException) -> str:
    """The first line of an error's message, whitespace collapsed (its type's name when empty)."""
    return " ".join(str(e).split("\n")[0].split()) or type(e).__name__


def one_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, whitespace collapsed; for an
    ``OSError`` its type, path and reason; a ``RuntimeError`` of unknown kind says how to see its
    traceback."""
    if isinstance(e, OSError) and not isinstance(e, ValueError) and e.strerror:  # the system's, not ours
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        what = e.strerror or " ".join(str(e).split()) or type(e).__name__
        return f"{type(e).__name__}{where}: {what} (check the path and its permissions)"
    text = first_line(e)
    if isinstance(e, RuntimeError) and not isinstance(e, NonFiniteError):
        return f"{text} (--debug shows the traceback)"
    return text


@contextlib.contextmanager
def one_line_warnings(command: str):
    """A context in which every warning prints as one line, ``<command>: warning: ...`` on stderr
    (no file, line number or source line: those are for developers, ``--debug`` keeps them)."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{command}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def guarded(command: str, fn, debug: bool = False) -> int:
    """Run ``fn()`` and return its exit code; an expected error (:data:`EXPECTED_ERRORS`)
    becomes one line ``<command>: error: ...`` on stderr and exit code 2 (``debug``: raised, with
    its traceback); Ctrl-C exits with 130. Warnings print as one line each
    (:func:`one_line_warnings`; ``debug`` keeps Python's format)."""
    try:
        with contextlib.nullcontext() if debug else one_line_warnings(command):
            return fn()
    except UsageError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{command}: interrupted; what was finished is saved (run the same command again to resume)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as e:
        if debug:
            raise
        print(f"{command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
