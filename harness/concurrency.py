"""Sweeps side by side and the lifetime of their processes.

- A lock per run record: ``record_lock`` holds ``<records>/.locks/<dataset>/<record>.lock`` with
  ``flock``, which the OS releases when the holder dies, however it dies. ``compute_once`` computes
  a record under its lock unless another process wrote it meanwhile, so two sweeps on one records
  folder never compute a run twice: the second waits for the first's record and reads it.
- Signals: within ``stop_on_signals`` SIGINT and SIGTERM raise ``Stopped`` in the main thread, so
  the sweep unwinds (``finally`` blocks remove temporary files, release locks) and exits 130 / 143.
  Only the first stop signal raises. It can interrupt a ``finally`` that releases a lock (Python
  handles a signal between any two bytecodes), so a stopping process releases the locks it still
  has open once more where nothing interrupts it: at exit, or before a stopped worker exits.
- Workers die with their parent: ``worker_init`` (a process pool's initializer) asks Linux to send
  the worker SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), SIGKILL included; where
  that is unavailable a thread polls ``os.getppid()``.
"""
from __future__ import annotations

import atexit
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


def _stop(signum, frame):
    """The handler of the stop signals: the first raises ``Stopped``, later ones are ignored while
    the process unwinds (it removes temporary files, releases locks, stops its workers)."""
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def _stop_signals_to(handler):
    """Within the block, SIGINT and SIGTERM go to ``handler``; the previous handlers come back
    afterwards. A signal this process was started ignoring stays ignored (a shell starts
    background jobs with SIGINT ignored). Outside the main thread, where Python runs no signal
    handler, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


@contextlib.contextmanager
def stop_on_signals(left: str = "every finished run keeps its record; the same command resumes "
                                  "the rest"):
    """Within the block, the first SIGINT or SIGTERM raises ``Stopped`` here (``left``: what the
    stop leaves, said on stderr with the signal's name, not a traceback); later ones are
    ignored while the block unwinds (it stops its workers, which takes bounded time)
    (``_stop_signals_to``: the previous handlers come back afterwards)."""
    with _stop_signals_to(_stop):
        try:
            yield
        except Stopped as stopped:
            print(f"mmpetl: stopped by {stopped.signal.name}: {left}", file=sys.stderr, flush=True)
            raise


@contextlib.contextmanager
def stop_when_asked(ask_to_stop: Callable[[], None]):
    """For a block that stops cleanly when asked (Ray Tune's loop ends its trials and returns):
    the first SIGINT or SIGTERM calls ``ask_to_stop`` and the block goes on to its end, then raises
    ``Stopped``; a second stop signal raises at once. Yields the signals received so far (a list).
    Otherwise as ``stop_on_signals``, which says what the stop left."""
    received = []

    def asked(signum, frame):
        if received:  # asked twice: stop now
            _stop(signum, frame)
        received.append(signum)
        print(f"mmpetl: {signal.Signals(signum).name} received: stopping the running trials "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
        ask_to_stop()

    with _stop_signals_to(asked):
        yield received
    if received:
        raise Stopped(received[0])


def worker_init(parent_pid: int) -> None:
    """Initializer of a pool's worker processes, started by ``parent_pid`` (fork or spawn: the
    worker is its direct child). SIGINT is ignored (a terminal's Ctrl-C reaches the whole process
    group: the parent decides and stops its workers with SIGTERM); SIGTERM raises ``Stopped``; the
    worker gets SIGTERM when its parent dies. Linux sends the death signal when the parent THREAD
    that started the worker ends: pools are started from the main thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
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
        release_open_locks()  # ``os._exit`` runs no exit handler
        os._exit(stopped.code)


@contextlib.contextmanager
def one_at_a_time(path: Path, what: str):
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block: a second
    process says so on stderr (``what`` it waits for) and waits. The lock goes with the process
    (``flock``): a killed holder leaves no lock behind, and no lock file beside ``path``."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"mmpetl: {path} is locked by another process; waiting for {what}",
                  file=sys.stderr, flush=True)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def lock_path(out_dir: Path, record: Path) -> Path:
    """``<out_dir>/.locks/<dataset>/<record name>.lock`` for ``record`` under ``out_dir``."""
    return Path(out_dir) / LOCKS / Path(record).relative_to(out_dir).with_suffix(".lock")


# The lock files this process has open: descriptor -> path. ``_release`` removes each entry as it
# closes the descriptor; what a stop left here is released by ``release_open_locks``. A forked
# child starts with none: the open file descriptions it inherits, and their flocks, are its parent's.
_open_locks: dict[int, Path] = {}
os.register_at_fork(after_in_child=_open_locks.clear)


@contextlib.contextmanager
def record_lock(out_dir: Path, record: Path):
    """Hold the lock of ``record`` (a run record under ``out_dir``) for the block. When another
    process holds it, say so on stderr and wait. The lock file holds its holder's pid and is
    removed before the lock is released; a waiter that then finds its file gone locks the new one
    (so a removed lock file never lets two processes in)."""
    path = lock_path(out_dir, record)
    told = False
    while True:
        descriptor = _open_lock_file(path)
        try:
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
            _release(descriptor)
            raise
        _release(descriptor)  # removed meanwhile by its holder: open the new one
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        _release(descriptor)


def _open_lock_file(path: Path) -> int:
    """Open (create) the lock file ``path`` and note it in ``_open_locks``, with the stop signals
    blocked meanwhile: a stop between the two would leave a file nobody releases."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        _open_locks[descriptor] = path
        return descriptor
    except OSError as error:
        raise InputError("cannot create the run's lock file", file=str(path),
                         expected="a writable records folder",
                         found=error.strerror or type(error).__name__) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _release(descriptor: int) -> None:
    """Close a lock file this process opened, removing it first when this process holds it or
    nobody does (locking it again is then immediate: ``flock`` on a descriptor that holds the lock
    keeps it). A file another process holds (this one was waiting) is left to its holder. Called
    again for the same descriptor, it does nothing."""
    path = _open_locks.get(descriptor)
    if path is None:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _is_file_at(descriptor, path):
            os.unlink(path)
    except OSError:  # held by another process, or already removed
        pass
    del _open_locks[descriptor]
    os.close(descriptor)


@atexit.register
def release_open_locks() -> None:
    """Release every lock file this process still has open (see ``_open_locks``)."""
    for descriptor in list(_open_locks):
        _release(descriptor)


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
