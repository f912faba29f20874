"""A Ray instance of one sweep's own on this machine: ``ray start --head --block`` in a child process.

``mmpetl sweep`` and ``mmpetl search`` with the ray executor and no RAY_ADDRESS start it first thing
(``started_early``), so Ray's processes come up while the driver imports torch and the harness and
makes its plans (each about 5 s on 2 cores: side by side instead of one after the other);
``ray_executor.ray_session`` joins it with ``ray.init(address=...)`` and it stops when the command
ends. A caller that did not start one early (a test calling ``sweep``) gets one started on the spot.

Only what a sweep on one machine uses runs: no dashboard, no autoscaler monitor and no log monitor
(workers' output stays in the session's log files; the driver asks for none), and no worker is
prestarted when the driver connects (Tune's trial actors start their own, and prestarted ones sat
idle until killed). Nor does the dashboard's API server: Ray 2.60 starts it even with
``--include-dashboard=false`` (one module, for usage stats) and the head waits for it to register
(1.5 CPU-s, and 1.5-2.8 s of the head's 6.0-6.5 s start on an idle machine). No switch turns it
off, but a head whose dashboard port is taken logs an error and starts none when the dashboard
was not asked for; so the head is given a port that this module holds (listening) until the head
is up. The head's process gets SIGTERM when this process dies, however it dies, and
``ray start --block`` then stops the node's processes. It runs in a session of its own, so a
terminal's Ctrl-C reaches the driver only: the driver stops its trials, then the head
(``ray_executor._fit``), instead of finding its head gone and waiting for it. Its sessions, logs
and sockets go to a folder of its own, removed at the stop: none is left in Ray's shared /tmp/ray,
and its ``ray_current_cluster`` (what a bare ``ray status`` joins) never names this head.

This module imports neither Ray nor torch: it runs before them.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.concurrency import parent_death_signal

STARTED = "Ray runtime started"  # what ``ray start`` prints once the head node is up
START_TIMEOUT_S = 180.0
# the node's processes read these when they start (the raylet's configuration); no drain on stop:
# it lets a Ray Serve node hand its traffic over (0.5 s here), and a sweep's driver is gone by then
HEAD_ENV = {"RAY_prestart_worker_first_driver": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}

_early: LocalRay | None = None  # the instance started by ``started_early``, joined by ray_session


class LocalRay:
    """``ray start --head --block`` with ``cpus`` CPUs, on a free port of this machine."""

    def __init__(self, cpus: int):
        with socket.socket() as probe:  # a port of our own: never another instance on this machine
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        # the dashboard's port, taken: the head then starts no API server (module docstring)
        self.taken = socket.socket()
        self.taken.bind(("127.0.0.1", 0))
        self.taken.listen()
        self.dashboard_port = self.taken.getsockname()[1]
        self.cpus = cpus
        # Ray's folder of its own (sessions, logs, sockets), removed at the stop: nothing is left
        # in Ray's shared /tmp/ray, whose ray_current_cluster would name this head once it is gone
        self.temp_dir = Path(tempfile.mkdtemp(prefix="mmpetl-ray-"))
        self.log = self.temp_dir / "head.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                 f"--port={self.port}", f"--num-cpus={cpus}", f"--temp-dir={self.temp_dir}",
                 "--include-dashboard=false",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                 "--no-monitor", "--include-log-monitor=false", "--disable-usage-stats"],
                env={**os.environ, **HEAD_ENV, **same_auth_mode()}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=lambda: parent_death_signal(signal.SIGTERM),
                start_new_session=True)

    def address(self) -> str:
        """The head's address, once it is up (waits for ``ray start`` to say so)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while STARTED not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                what = (f"exited {self.process.returncode}" if self.process.returncode is not None
                        else f"did not start within {START_TIMEOUT_S:.0f} s")
                taken = f"127.0.0.1:{self.dashboard_port} because it's already occupied"
                lines = [line for line in self.log.read_text(errors="replace").splitlines()
                         if taken not in line]  # the error the taken dashboard port is meant to cause
                tail = "\n".join(lines[-20:])
                raise RuntimeError(f"the sweep's Ray instance (ray start --head --port={self.port}) "
                                   f"{what}; its output (last lines of {self.log}):\n{tail}")
            time.sleep(0.1)
        self.taken.close()
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop the head and the node's processes; wait for them."""
        self.taken.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def local_cpus(workers: int, cpus_per_trial: float) -> int:
    """The CPUs of an instance for ``workers`` trials at once of ``cpus_per_trial`` CPUs each
    (``ray_executor.RayOptions.local_cpus``): Tune would wait forever for a trial that asks for
    more than the instance has."""
    return max(1, math.ceil(workers * cpus_per_trial))


def same_auth_mode() -> dict:
    """The driver's authentication mode for the head: ``ray start --head`` turns token
    authentication on when ~/.ray/auth_token exists, whereas a driver (like a local instance started
    by ``ray.init``) uses RAY_AUTH_MODE, default ``disabled``, and could then not connect."""
    return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


@contextlib.contextmanager
def running(cpus: int):
    """A ``LocalRay`` of ``cpus`` CPUs, stopped when the block ends."""
    head = LocalRay(cpus)
    try:
        yield head
    finally:
        head.stop()


@contextlib.contextmanager
def started_early(cpus: int):
    """A local Ray instance starting now, for the ``ray_session`` that comes later in this block;
    stopped when the block ends."""
    global _early
    with running(cpus) as _early:
        try:
            yield
        finally:
            _early = None


@contextlib.contextmanager
def instance(cpus: int):
    """The instance started early when it has at least ``cpus`` CPUs (left running: its block stops
    it), else one started now and stopped at the end of this block. Yields it."""
    if _early is not None and _early.cpus >= cpus:
        yield _early
        return
    with running(cpus) as head:
        yield head
