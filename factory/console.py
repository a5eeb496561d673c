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

_terminal = None  # the terminal's (stdout, stderr) while quiet() redirects fds 1 and 2
_log_path: Path | None = None


def out():
    """Where bars and notes go: the terminal's stderr."""
    return _terminal[1] if _terminal else sys.stderr


def say(msg: str = "") -> None:
    """A line of the command's report: the terminal's stdout (so `factory eval ... > report.txt` works)."""
    print(msg, file=_terminal[0] if _terminal else sys.stdout, flush=True)


def log_path() -> Path | None:
    """The log file library output goes to, while quiet() is active."""
    return _log_path


def bar(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False):
    """A tqdm bar on the terminal (one live line)."""
    from tqdm.auto import tqdm

    stream = out()
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    # into a file or a pipe (CI, nohup), a bar redrawn 10 times a second is megabytes of lines:
    # there it writes one line every 30 s
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream,
                dynamic_ncols=True, leave=True, position=0, mininterval=0.1 if tty else 30.0)


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
    terminal = _keep(sys.stdout, 1), _keep(sys.stderr, 2)
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
        for stream, fd in zip(terminal, (1, 2)):
            if stream is not sys.stdout and stream is not sys.stderr:
                stream.close()
        _terminal, _log_path = None, None


def _keep(stream, fd: int):
    """The stream that still reaches the terminal once fd is redirected: a copy of fd when
    `stream` writes to it, else `stream` itself (pytest's capture, a notebook's widget)."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1)
    except (AttributeError, OSError, ValueError):
        pass
    return stream
