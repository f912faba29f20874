"""Signals, processes and concurrency (issue 13): a stop signal ends a sweep within seconds with
130 / 143 and nothing partial, workers die with their parent, and a lock per run record makes
sweeps side by side compute each run once. Every case runs real processes and sends real signals;
the fast tests drive ``harness.concurrency`` in small Python processes, the slow ones a real
``mmpetl sweep``."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from harness.concurrency import compute_once, lock_path, record_lock
from helpers import ROOT, small_mosi_params

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
STOP_BOUND_S = 20  # generous: a stopped sweep exits within seconds


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn``: SIGINT at its default in the child, as in a terminal's foreground job. A
    shell starts background jobs with SIGINT ignored and mmpetl keeps ignoring a signal it was
    started ignoring (tested below), so a test run started in the background would otherwise pass
    that on to the processes these tests stop with SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def python(script: str, *args, **popen) -> subprocess.Popen:
    """A Python process running ``script`` with the project importable, its stdout a pipe."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_in_a_terminal, **popen)


def gone(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` ends (or is a zombie waiting for its reaper) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


HOLDER = """
    import sys, time
    from pathlib import Path
    from harness.concurrency import record_lock
    out, record = Path(sys.argv[1]), Path(sys.argv[2])
    with record_lock(out, record):
        print("held", flush=True)
        sys.stdin.readline()  # the test says when the run is done
        record.parent.mkdir(exist_ok=True)
        record.write_text("{}")
"""


def test_a_held_lock_makes_the_other_process_wait_and_read_the_record(tmp_path, capfd):
    record = tmp_path / "mosi" / "linear-seed0-abc.json"
    holder = python(HOLDER, tmp_path, record, stdin=subprocess.PIPE)
    assert holder.stdout.readline() == "held\n"
    threading.Timer(1.0, lambda: holder.communicate("done\n")).start()
    started = time.monotonic()
    calls = []
    assert compute_once(tmp_path, record, lambda: calls.append(1)) is False  # read, not computed
    assert calls == [] and time.monotonic() - started >= 0.9  # it waited for the holder
    message = capfd.readouterr().err
    assert f"mosi/{record.name} is being computed by another process (pid {holder.pid})" in message
    assert holder.wait(10) == 0
    assert not lock_path(tmp_path, record).exists()  # released and removed


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    record = tmp_path / "mosi" / "linear-seed0-abc.json"
    holder = python(HOLDER, tmp_path, record, stdin=subprocess.PIPE)
    assert holder.stdout.readline() == "held\n"
    holder.kill()  # SIGKILL: no cleanup in the holder, the OS releases its flock
    holder.wait()
    record.parent.mkdir()
    calls = []

    def compute():
        calls.append(1)
        record.write_text("{}")

    assert compute_once(tmp_path, record, compute) is True  # not left waiting for the dead holder
    assert calls == [1] and record.is_file()


RACER = """
    import os, sys, time
    from pathlib import Path
    from harness.concurrency import compute_once
    out, log, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    time.sleep(float(sys.argv[4]) - time.time())  # every racer starts at the same moment

    def compute(record):
        with open(log, "a") as stream:  # one appended line per computation
            stream.write(f"{record.name} {os.getpid()}\\n")
        time.sleep(0.05)
        record.parent.mkdir(exist_ok=True)
        record.write_text("{}")

    for index in range(count):
        record = out / "mosi" / f"run{index}-seed0-key.json"
        compute_once(out, record, lambda: compute(record))
"""


def test_processes_side_by_side_compute_each_record_once(tmp_path):
    log, count = tmp_path / "computed.log", 12
    start = time.time() + 1.5
    racers = [python(RACER, tmp_path / "runs", log, count, start, stderr=subprocess.DEVNULL)
              for _ in range(3)]
    assert [racer.wait(60) for racer in racers] == [0, 0, 0]
    computed = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(computed) == sorted(f"run{i}-seed0-key.json" for i in range(count))
    assert len(list((tmp_path / "runs" / "mosi").glob("*.json"))) == count
    assert list((tmp_path / "runs" / ".locks").rglob("*.lock")) == []


STOPPABLE = """
    import sys, time
    from harness.concurrency import stop_on_signals
    from harness.records import atomic_file
    with stop_on_signals(), atomic_file(sys.argv[1]) as stream:
        stream.write("half a record")
        print("writing", flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_exits_128_plus_its_number_leaving_nothing_partial(tmp_path, signum):
    target = tmp_path / "record.json"
    process = python(STOPPABLE, target, stderr=subprocess.PIPE)
    assert process.stdout.readline() == "writing\n"
    assert len(list(tmp_path.iterdir())) == 1  # the temporary file being written
    sent = time.monotonic()
    process.send_signal(signum)
    assert process.wait(STOP_BOUND_S) == 128 + signum  # 130 / 143
    assert time.monotonic() - sent < 5
    assert f"stopped by {signal.Signals(signum).name}" in process.stderr.read()
    assert list(tmp_path.iterdir()) == []  # neither the record nor its temporary file


def test_a_signal_the_process_was_started_ignoring_stays_ignored(tmp_path):
    """A shell starts background jobs with SIGINT ignored: ``mmpetl sweep &`` must not stop on it."""
    process = python("""
        import signal, time
        from harness.concurrency import stop_on_signals
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with stop_on_signals():
            print("running", flush=True)
            time.sleep(60)
    """, stderr=subprocess.DEVNULL)
    assert process.stdout.readline() == "running\n"
    process.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(1)  # still running
    process.send_signal(signal.SIGTERM)
    assert process.wait(STOP_BOUND_S) == 128 + signal.SIGTERM


ORPHAN = """
    import concurrent.futures, multiprocessing, os, sys, time
    from harness import concurrency

    method, watch = sys.argv[1], sys.argv[2]
    if watch == "getppid":  # the fallback where PR_SET_PDEATHSIG is unavailable (fork inherits it)
        concurrency.parent_death_signal = lambda signum: False
    # the process executor's pool: its initializer, one worker busy with a long task, wrapped
    # as the executor wraps every run
    pool = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context(method), initializer=concurrency.worker_init,
        initargs=(os.getpid(),))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(concurrency.exit_when_stopped, time.sleep, 120)
    time.sleep(120)
"""


@pytest.mark.parametrize("method, watch", [("fork", "prctl"), ("spawn", "prctl"), ("fork", "getppid")])
def test_a_pool_worker_dies_when_its_parent_is_killed(method, watch):
    """Fork: the sweep's start method; spawn: its start method once CUDA is initialised."""
    parent = python(ORPHAN, method, watch)
    worker = int(parent.stdout.readline())
    assert psutil.Process(worker).ppid() == parent.pid
    time.sleep(0.3)  # the worker has taken the long task
    parent.kill()  # SIGKILL: the parent cannot stop its worker itself
    parent.wait()
    assert gone(worker, within_s=5), f"worker {worker} outlived its killed parent ({method}, {watch})"


# --- a real process-executor sweep ------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_params(tmp_path_factory):
    """A 12-run grid on small generated MOSI: 4 rows x 3 seeds, 1 epoch."""
    folder = tmp_path_factory.mktemp("signals")
    params = small_mosi_params(folder)
    params["datasets"], params["seeds"] = ["mosi"], [0, 1, 2]
    params["grid"] = {"mosi": [{"method": "linear"}, {"method": "lora", "rank": 4},
                               {"method": "wander", "down_dim": 8}, {"method": "adapter", "down_dim": 8}]}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def sweep_command(params: Path, out: Path, workers: int = 2, executor: str = "process") -> list[str]:
    return [sys.executable, "-m", "harness.cli", "sweep", "--executor", executor, "--workers",
            str(workers), "--params", str(params), "--out", str(out), "--json"]


def start_sweep(params: Path, out: Path, executor: str = "process") -> subprocess.Popen:
    """A sweep in a session of its own (its process group, as a terminal job)."""
    return subprocess.Popen(sweep_command(params, out, executor=executor), cwd=ROOT,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=sigint_as_in_a_terminal)


def records_in(out: Path) -> list[Path]:
    return sorted(out.glob("mosi/*.json"))


def wait_for_records(out: Path, count: int, process: subprocess.Popen) -> list[psutil.Process]:
    """Wait until ``count`` records exist; the sweep's worker processes then."""
    deadline = time.monotonic() + 300
    while len(records_in(out)) < count:
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended early"
        time.sleep(0.1)
    workers = psutil.Process(process.pid).children(recursive=True)
    assert workers, "a process-executor sweep has worker processes"
    return workers


def assert_nothing_partial(out: Path, finished: list[Path]) -> None:
    """Records do not grow after the stop, each is whole, no temporary or lock file is left."""
    time.sleep(3)
    left = records_in(out)
    assert left == finished, "records were written after the sweep stopped"
    for path in left:
        assert "metrics" in json.loads(path.read_text())
    assert [p.name for p in out.rglob("*.tmp")] == []
    assert list((out / ".locks").rglob("*.lock")) == []


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["process", "ray"])
@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-job", "sigterm-to-the-sweep"])
def test_a_stop_signal_ends_a_sweep_within_seconds(sweep_params, tmp_path, signum, to_group, executor):
    """Ctrl-C in a terminal signals the whole job (sweep and workers); ``kill`` or DVC signal the
    sweep alone. Before: the process executor's sweep ran every queued run (SIGINT) or died leaving
    its workers on; the Ray executor's ended with "runs have no record" (exit 1) after Ctrl-C."""
    if executor == "ray":
        pytest.importorskip("ray")
    out = tmp_path / "runs"
    process = start_sweep(sweep_params, out, executor)
    workers = wait_for_records(out, 2, process)
    sent = time.monotonic()
    (os.killpg if to_group else os.kill)(process.pid, signum)
    assert process.wait(STOP_BOUND_S) == 128 + signum
    assert time.monotonic() - sent < STOP_BOUND_S
    assert f"stopped by {signal.Signals(signum).name}" in process.stderr.read()
    assert all(gone(worker.pid, within_s=5) for worker in workers)
    finished = records_in(out)
    assert 2 <= len(finished) < 12  # stopped early, nothing finished lost
    assert_nothing_partial(out, finished)


@pytest.mark.slow
def test_sigkill_of_a_process_sweep_leaves_no_worker(sweep_params, tmp_path):
    out = tmp_path / "runs"
    process = start_sweep(sweep_params, out)
    workers = wait_for_records(out, 1, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    alive = [w.pid for w in workers if not gone(w.pid, within_s=10)]
    assert alive == [], f"workers {alive} outlived the killed sweep"
    assert_nothing_partial(out, records_in(out))


@pytest.mark.slow
def test_two_sweeps_on_one_folder_compute_each_run_once(sweep_params, tmp_path):
    """Two sweeps started together on one records folder: every run computed by exactly one of
    them (the computed counts add up to the grid, and no record file is ever replaced: an
    atomic rewrite would give it a new inode), both end with every record."""
    out = tmp_path / "runs"
    sweeps = [subprocess.Popen(sweep_command(sweep_params, out, workers=1), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    first_inode = {}
    while any(s.poll() is None for s in sweeps):
        for path in records_in(out):
            first_inode.setdefault(path.name, path.stat().st_ino)
        time.sleep(0.05)
    outputs = [s.communicate() for s in sweeps]
    assert [s.returncode for s in sweeps] == [0, 0], [err[-2000:] for _, err in outputs]
    summaries = [json.loads(stdout) for stdout, _ in outputs]
    assert sum(s["computed"] for s in summaries) == 12
    assert all(s["computed"] + s["reused"] == 12 for s in summaries)
    final = {path.name: path.stat().st_ino for path in records_in(out)}
    assert len(final) == 12 and final == {name: first_inode.get(name, ino) for name, ino in final.items()}


COPIER = """
    import shutil, sys
    from pathlib import Path
    from harness.concurrency import record_lock
    out, record, source = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    with record_lock(out, record):
        print("held", flush=True)
        sys.stdin.readline()  # the test says when the run is done
        record.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, record)
"""


def _linear_run_computed(tmp_path, monkeypatch) -> tuple[list, Path]:
    """The ``mmpetl run`` arguments of a linear-probe MOSI run on small data in ``tmp_path`` (the
    working directory now, so the feature cache goes there), and its record computed once into
    ``tmp_path/first``."""
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    params = small_mosi_params(tmp_path)
    params.update(datasets=["mosi"], grid={"mosi": [{"method": "linear"}]})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    argv = ["run", "--params", str(path), "--dataset", "mosi", "--method", "linear", "--json"]
    assert main(argv + ["--out", str(tmp_path / "first")]) == 0
    (computed,) = (tmp_path / "first" / "mosi").glob("*.json")
    return argv, computed


def test_mmpetl_run_waits_for_a_run_being_computed_and_reads_its_record(tmp_path, monkeypatch,
                                                                          capsys):
    """`mmpetl run --out DIR` takes the run's lock like a sweep's trial: while another process
    computes the same run into DIR, it waits, then reads the record instead of computing it."""
    from harness.cli import main

    argv, computed = _linear_run_computed(tmp_path, monkeypatch)
    record = tmp_path / "second" / "mosi" / computed.name
    holder = python(COPIER, tmp_path / "second", record, computed, stdin=subprocess.PIPE)
    assert holder.stdout.readline() == "held\n"
    threading.Timer(1.0, lambda: holder.communicate("done\n")).start()
    monkeypatch.setattr("harness.run.fine_tune", lambda *a, **k: pytest.fail("computed again"))
    capsys.readouterr()
    started = time.monotonic()
    assert main(argv + ["--out", str(tmp_path / "second")]) == 0
    assert time.monotonic() - started >= 0.9  # it waited for the holder
    out, err = capsys.readouterr()
    assert json.loads(out)["run_status"] == {"reused": True, "record": str(record)}
    assert "is being computed by another process" in err
    assert holder.wait(10) == 0


def test_mmpetl_run_waits_for_the_study_computing_the_same_run(tmp_path, monkeypatch, capsys):
    """`mmpetl run` into its own folder (default .mmpetl/runs) while a sweep computes the same
    run into results/runs: it waits for the study's lock, then reads the study's record (it
    computed the run a second time)."""
    from harness.cli import main
    from harness.run import RUNS_DIR

    argv, computed = _linear_run_computed(tmp_path, monkeypatch)
    record = tmp_path / RUNS_DIR / "mosi" / computed.name
    holder = python(COPIER, tmp_path / RUNS_DIR, record, computed, stdin=subprocess.PIPE)
    assert holder.stdout.readline() == "held\n"
    threading.Timer(1.0, lambda: holder.communicate("done\n")).start()
    monkeypatch.setattr("harness.run.fine_tune", lambda *a, **k: pytest.fail("computed again"))
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "mine")]) == 0
    status = json.loads(capsys.readouterr().out)["run_status"]
    assert status == {"reused": True, "record": str(RUNS_DIR / "mosi" / computed.name)}
    assert holder.wait(10) == 0 and not list((tmp_path / "mine").rglob("*.json"))


def stop_at_flock(monkeypatch, blocking: bool) -> None:
    """The next non-blocking (``blocking=False``) or blocking ``flock`` raises ``Stopped``, as a
    SIGTERM arriving there would; every other call is the real one."""
    import fcntl

    from harness import concurrency

    real, armed = fcntl.flock, [True]

    def flock(descriptor, operation):
        if armed[0] and bool(operation & fcntl.LOCK_NB) != blocking:
            armed[0] = False
            raise concurrency.Stopped(signal.SIGTERM)
        return real(descriptor, operation)

    monkeypatch.setattr(concurrency.fcntl, "flock", flock)


def test_a_sweep_stopped_while_taking_a_free_lock_leaves_no_lock_file(tmp_path, monkeypatch):
    """Stopped between creating the lock file and holding it: nobody else holds the file, so it
    is removed (a killed sweep's worker used to leave it behind)."""
    from harness.concurrency import Stopped

    record = tmp_path / "mosi" / "linear-seed0-abc.json"
    stop_at_flock(monkeypatch, blocking=False)
    with pytest.raises(Stopped):
        with record_lock(tmp_path, record):
            pass
    assert list((tmp_path / ".locks").rglob("*.lock")) == []


def test_a_sweep_stopped_while_waiting_leaves_the_holders_lock_file(tmp_path, monkeypatch):
    """Stopped while waiting for a lock another process holds: the holder's file stays."""
    import fcntl

    from harness.concurrency import Stopped

    record = tmp_path / "mosi" / "linear-seed0-abc.json"
    path = lock_path(tmp_path, record)
    path.parent.mkdir(parents=True)
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # another open file: another holder
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        stop_at_flock(monkeypatch, blocking=True)
        with pytest.raises(Stopped):
            with record_lock(tmp_path, record):
                pass
        assert path.is_file()
    finally:
        os.close(holder)


INTERRUPTED_RELEASE = """
    import signal, sys
    from pathlib import Path
    from harness import concurrency

    out, record, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    real, armed = concurrency._release, [True]

    def release(descriptor):  # the stop signal arrives as the lock's release begins
        if armed[0]:
            armed[0] = False
            raise concurrency.Stopped(signal.SIGTERM)
        real(descriptor)

    concurrency._release = release

    def compute():
        record.parent.mkdir(exist_ok=True)
        record.write_text("{}")

    if where == "worker":  # a pool worker's run: it ends with os._exit
        concurrency.exit_when_stopped(concurrency.compute_once, out, record, compute)
    else:  # the sweep's own process: Stopped ends the interpreter
        with concurrency.stop_on_signals():
            concurrency.compute_once(out, record, compute)
"""


@pytest.mark.parametrize("where", ["worker", "main"])
def test_a_stop_that_interrupts_the_locks_release_leaves_no_lock_file(tmp_path, where):
    """A stop signal is handled between any two bytecodes, so it can arrive inside the ``finally``
    that releases a record's lock, just after the record was written (a CI run's SIGKILLed sweep
    left such a lock file). The stopping process releases it before it exits."""
    record = tmp_path / "mosi" / "linear-seed0-abc.json"
    process = python(INTERRUPTED_RELEASE, tmp_path, record, where, stderr=subprocess.PIPE)
    _, err = process.communicate(timeout=STOP_BOUND_S)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert record.is_file()
    assert list((tmp_path / ".locks").rglob("*.lock")) == []


def test_releasing_a_lock_twice_is_harmless_and_spares_another_holders_file(tmp_path):
    """``release_open_locks`` may meet a lock whose release was interrupted after the file was
    removed, or one this process was waiting for: neither the holder's file nor a reused
    descriptor number is touched."""
    import fcntl

    from harness import concurrency

    record = tmp_path / "mosi" / "linear-seed0-abc.json"
    path = lock_path(tmp_path, record)
    with record_lock(tmp_path, record):
        (descriptor,) = concurrency._open_locks
    concurrency._release(descriptor)  # a second release: no longer noted, nothing done
    assert concurrency._open_locks == {} and not path.exists()
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # another process's lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        concurrency._open_lock_file(path)  # opened by a waiter, then stopped
        concurrency.release_open_locks()
        assert concurrency._open_locks == {} and path.is_file()
    finally:
        os.close(holder)
