"""Sweeps side by side and the lifetime of their processes.

- A lock per run record: ``record_lock`` holds ``<records>/.locks/<dataset>/<record>.lock`` with
  ``flock``, which the OS releases when the holder dies, however it dies. ``compute_once`` computes
  a record under its lock unless another process wrote it meanwhile, so two sweeps on one records
  folder never compute a run twice: the second waits for the first's record and reads it.
- Signals: within ``stop_on_signals`` SIGINT and SIGTERM raise ``Stopped`` in the main thread, so
  the sweep unwinds (``finally`` blocks remove temporary files, release locks) and exits 130 / 143.
- Workers die with their parent: ``worker_init`` (a process pool's initializer) asks Linux to send
  the worker SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), SIGKILL included; where
  that is unavailable a thread polls ``os.getppid()``.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from harness.errors import InputError

# Lock files, inside the records folder (.gitignore and .dvcignore skip it)
LOCKS = ".locks"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 1.0  # how often a worker without PR_SET_PDEATHSIG checks that its parent lives


class Stopped(SystemExit):
    """A signal asked this process to stop. A SystemExit: uncaught, it exits quietly with 128 + the
    signal's number, the status a shell reports for a process the signal killed (130 for SIGINT,
    143 for SIGTERM); ``except Exception`` does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum)


def _raise_stopped(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, the first SIGINT or SIGTERM raises ``Stopped`` here; later ones are
    ignored while the block unwinds (it stops its workers, which takes bounded time). The previous
    handlers come back afterwards. A signal this process was started ignoring stays ignored (a
    shell starts background jobs with SIGINT ignored). Outside the main thread, where Python runs
    no signal handler, the block runs unchanged."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for other in STOP_SIGNALS:
            signal.signal(other, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    except Stopped as stopped:
        print(f"mmpetl: stopped by {stopped.signal.name}: every finished run keeps its record; "
              "the same command resumes the rest", file=sys.stderr, flush=True)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def worker_init(parent_pid: int) -> None:
    """Initializer of a pool's worker processes, started by ``parent_pid`` (fork or spawn: the
    worker is its direct child). SIGINT is ignored (a terminal's Ctrl-C reaches the whole process
    group: the parent decides and stops its workers with SIGTERM); SIGTERM raises ``Stopped``; the
    worker gets SIGTERM when its parent dies. Linux sends the death signal when the parent THREAD
    that started the worker ends: pools are started from the main thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_stopped)
    if not parent_death_signal(signal.SIGTERM):
        _watch_parent(parent_pid)
    if os.getppid() != parent_pid:  # the parent died before the death signal was set
        os._exit(128 + signal.SIGTERM)


def parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) == 0


def _watch_parent(parent_pid: int) -> None:
    """A daemon thread that sends this process SIGTERM once its parent is gone (it is then
    re-parented, so ``os.getppid()`` changes)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="mmpetl-parent-watch", daemon=True).start()


def exit_when_stopped(function: Callable, *args):
    """Call ``function(*args)`` in a pool worker. When a signal stops it (``Stopped``, raised after
    the unwinding removed its temporary files and released its lock), end the worker at once: a
    ``concurrent.futures`` worker would otherwise report the exception and start the next run."""
    try:
        return function(*args)
    except Stopped as stopped:
        os._exit(stopped.code)


def lock_path(out_dir: Path, record: Path) -> Path:
    """``<out_dir>/.locks/<dataset>/<record name>.lock`` for ``record`` under ``out_dir``."""
    return Path(out_dir) / LOCKS / Path(record).relative_to(out_dir).with_suffix(".lock")


@contextlib.contextmanager
def record_lock(out_dir: Path, record: Path):
    """Hold the lock of ``record`` (a run record under ``out_dir``) for the block. When another
    process holds it, say so on stderr and wait. The lock file holds its holder's pid and is
    removed before the lock is released; a waiter that then finds its file gone locks the new one
    (so a removed lock file never lets two processes in)."""
    path = lock_path(out_dir, record)
    told = False
    while True:
        descriptor = None
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise InputError("cannot create the run's lock file", file=str(path),
                                 expected="a writable records folder",
                                 found=error.strerror or type(error).__name__) from None
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    print(f"mmpetl: {Path(record).relative_to(out_dir)} is being computed by "
                          f"{_holder(path)}; waiting for its record", file=sys.stderr, flush=True)
                    told = True
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            if _is_file_at(descriptor, path):
                break
        except BaseException:  # stopped (SIGTERM) or failed while taking the lock
            if descriptor is not None:
                _abandon(descriptor, path)
            raise
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)


def _abandon(descriptor: int, path: Path) -> None:
    """Close a lock file this process opened but was stopped before it held it for a run: removed
    when nobody holds it (this process then does, and removes it as a holder would), else left to
    its holder."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _is_file_at(descriptor, path):
            path.unlink(missing_ok=True)
    except OSError:  # held by another process: its holder removes it
        pass
    finally:
        os.close(descriptor)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"another process (pid {pid})" if pid.isdigit() else "another process"


def _is_file_at(descriptor: int, path: Path) -> bool:
    """Whether the open ``descriptor`` is still the file at ``path`` (not removed or replaced)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (opened.st_dev, opened.st_ino) == (found.st_dev, found.st_ino)


def compute_once(out_dir: Path, record: Path, compute: Callable[[], object]) -> bool:
    """Call ``compute`` (which writes ``record``) under the record's lock, unless the record is
    there once the lock is held (another process computed it while this one waited). True when
    computed here."""
    with record_lock(out_dir, record):
        if Path(record).is_file():
            return False
        compute()
        return True
