"""Errors a user can act on: one line on stderr, exit status 2, no traceback.

Bad input is found in three packages that must not import each other (``detector/`` imports only
``kernels/``, ``datasets/`` imports neither), so each raises its own small exception class, all of one
shape: ``what``, ``file``, ``field`` and ``todo`` attributes (``str(e)`` stays the package's own message):

* ``detector.checkpoint.CheckpointError``   a checkpoint refused, truncated, missing, or of another model;
* ``detector.configs.ConfigError``           a model name or input size no EfficientDet has;
* ``datasets.coco.DataError``                a malformed annotation file (``AnnotationError``, a ``ValueError``),
                                             an undecodable image (``ImageError``, an ``OSError``), a missing
                                             file (``MissingFileError``, a ``FileNotFoundError``);
* ``UserError`` (here)                       flags that cannot work together, a folder without images, ...

``run(main, argv)`` (used by ``train.py`` and ``evaluate.py``) prints ``error: <what> (<file>, <field>): <todo>`` for exactly these
classes and returns 2. Anything else is a bug and keeps its traceback. ``--debug`` or ``EFFDET_DEBUG=1``
re-raises the user errors too, traceback included.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """Bad input found by the scripts or ``training/``: ``error: <what> (<file>, <field>): <todo>``."""

    def __init__(self, what: str, file=None, field=None, todo: str = "see --help"):
        self.what, self.file, self.field, self.todo = what, file, field, todo
        super().__init__(f"{what} ({file or '-'}, {field or '-'}): {todo}")


class WorkerFailed(Exception):
    """A ``--nproc`` worker process ended with an error (already printed by that worker)."""

    def __init__(self, rank: int, exitcode: int):
        self.rank, self.exitcode = rank, exitcode
        if exitcode < 0:  # multiprocessing's code for a signal: the worker could print nothing
            import signal

            try:
                name = signal.Signals(-exitcode).name
            except ValueError:  # a signal number without a name here
                name = f"signal {-exitcode}"
            oom = " (out of memory? the kernel's killer sends SIGKILL)" if -exitcode == 9 else ""
            why = f"was killed by {name}{oom}"
        else:
            why = f"exited with status {exitcode}; its error is printed above"
        super().__init__(f"worker rank {rank} {why}")


@contextmanager
def naming(path):
    """A user error raised inside names ``path`` when it did not know its file (a dict already read)."""
    try:
        yield
    except user_error_types() as e:
        if getattr(e, "file", None) in (None, "checkpoint"):
            e.file = str(path)
        raise


@contextmanager
def from_flag(flag: str | None, missing_todo: str | None = None):
    """A user error raised inside that names no field of its file (the file missing, a folder, not readable as a
    whole) names ``flag``, the flag that gave the path (None: no flag did, nothing is named); ``missing_todo``
    replaces the advice for a missing file."""
    try:
        yield
    except user_error_types() as e:
        if flag is not None and getattr(e, "field", None) is None:
            e.field = flag
            if missing_todo and "not found" in (getattr(e, "what", None) or ""):
                e.todo = missing_todo
        raise


def user_error_types() -> tuple:
    from datasets.coco import DataError
    from detector.checkpoint import CheckpointError
    from detector.configs import ConfigError

    return (UserError, CheckpointError, DataError, ConfigError)


def debug_requested(argv) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("EFFDET_DEBUG", "") not in ("", "0")


def one_line(e: BaseException) -> str:
    """``<what> (<file>, <field>): <todo>`` of a user error, on one line.

    An error raised in a DataLoader worker process reaches us re-created from text alone ("Caught ImageError
    in DataLoader worker process 0. Original Traceback ... datasets.coco.ImageError: <file>: <what>"): its
    last line, less the class name, is the original message, which starts with the file.
    """
    what, file, field = getattr(e, "what", None), getattr(e, "file", None), getattr(e, "field", None)
    todo = getattr(e, "todo", None) or "see --help"
    if not what:
        what = str(e).strip()
    if "\n" in what:  # re-raised from a worker: keep the original message
        what = re.sub(r"^[\w.]+(Error|Exception): ", "", what.strip().splitlines()[-1].strip())
    if file is None:
        found = re.match(r"(\S+\.\w+): (.+)$", what)
        if found:
            file, what = found.groups()
    return " ".join(f"{what} ({file or '-'}, {field or '-'}): {todo}".split())


def run(main, argv=None) -> int:
    """``main(argv)``; a user error becomes one stderr line and exit status 2 (unless debugging)."""
    debug = debug_requested(argv)
    try:
        return main(argv)
    except user_error_types() as e:
        if debug:
            raise
        report(e)
        return EXIT_USER_ERROR
    except WorkerFailed as e:
        if e.exitcode == EXIT_USER_ERROR and not debug:  # that worker printed its one line
            return EXIT_USER_ERROR
        raise


def report(e: BaseException) -> None:
    sys.stdout.flush()
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
