"""The terminal and the logs.

By default a command shows only its own lines (`say`) and one live bar per stage (`bar`);
everything the libraries print (vLLM and its engine processes, transformers, datasets,
math-verify in the grading workers, Ray) goes to `RUN/logs/<command>.log`. This is done on
file descriptors 1 and 2, not on Python's logging: vLLM's engine core and the grading pool
are separate processes that inherit them, and some of what they print comes from C.

    with console.quiet(run_dir / "logs", "run", verbose=args.verbose):
        ...                      # say(...) and bar(...) reach the terminal; the rest, the log

`verbose` (`factory ... -v`) leaves the descriptors alone: everything reaches the terminal.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

_terminal = None  # the terminal's stream while quiet() redirects fds 1 and 2
_log_path: Path | None = None


def out():
    """Where the command's own lines and bars go: the terminal."""
    return _terminal or sys.stderr


def say(msg: str = "") -> None:
    print(msg, file=out(), flush=True)


def log_path() -> Path | None:
    """The log file library output goes to, while quiet() is active."""
    return _log_path


def bar(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False):
    """A tqdm bar on the terminal (one live line)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=out(),
                dynamic_ncols=True, leave=True, position=0)


@contextlib.contextmanager
def quiet(log_dir: Path | str, name: str, verbose: bool = False) -> Iterator[Path | None]:
    """Send fds 1 and 2 (this process and every process it starts) to log_dir/name.log;
    `say` and `bar` keep writing to the terminal. Nested calls and verbose=True do nothing."""
    global _terminal, _log_path
    if verbose or _terminal is not None:
        yield _log_path
        return
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    for s in (sys.stdout, sys.stderr):
        s.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _terminal, _log_path = terminal, path
    # Python-level writers too, in case sys.stdout / sys.stderr were replaced (pytest, notebooks)
    streams = sys.stdout, sys.stderr
    sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    try:
        yield path
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
                s.close()
            except (OSError, ValueError):
                pass
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()
        _terminal, _log_path = None, None
