"""The Ray instance of a sweep's own (harness/ray_local.py): started as the command starts, joined
by the sweep, stopped at its end or when its driver dies; a head that cannot start says why."""
import argparse
import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from harness import cli, ray_local
from helpers import ROOT, small_mosi_params


def started_with(monkeypatch, tmp_path, params_text: str, executor=None, workers=None):
    """The CPUs ``cli._ray_started_early`` starts a local instance with, or None when it starts none."""
    started = []
    monkeypatch.setattr(ray_local, "started_early", lambda cpus: started.append(cpus) or contextlib.nullcontext())
    params = tmp_path / "params.yaml"
    params.write_text(params_text)
    with cli._ray_started_early(argparse.Namespace(params=str(params), executor=executor, workers=workers)):
        pass
    return started[0] if started else None


def test_only_a_ray_command_without_an_address_starts_ray_early(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_yaml = yaml.safe_dump({"executor": {"kind": "ray", "workers": 3}})
    assert started_with(monkeypatch, tmp_path, ray_yaml) == 3
    assert started_with(monkeypatch, tmp_path, ray_yaml, workers=2) == 2  # --workers wins
    process_yaml = yaml.safe_dump({"executor": {"kind": "process", "workers": 2}})
    assert started_with(monkeypatch, tmp_path, process_yaml) is None
    assert started_with(monkeypatch, tmp_path, process_yaml, executor="ray") == 2
    assert started_with(monkeypatch, tmp_path, "profile: tiny\n", executor="ray") == os.cpu_count()
    assert started_with(monkeypatch, tmp_path, ray_yaml, executor="sequential") is None
    # trials of several CPUs: CPUs for `workers` of them (before: Tune waited forever for a trial
    # asking for more than the instance had)
    wide = yaml.safe_dump({"executor": {"kind": "ray", "workers": 2, "cpus_per_trial": 4}})
    assert started_with(monkeypatch, tmp_path, wide) == 8
    half = yaml.safe_dump({"executor": {"kind": "ray", "workers": 3, "cpus_per_trial": 0.5}})
    assert started_with(monkeypatch, tmp_path, half) == 2
    # what load_params refuses starts nothing here (it then names the file, key and value)
    assert started_with(monkeypatch, tmp_path, "executor: [unclosed\n") is None
    assert started_with(monkeypatch, tmp_path, "- a list\n", executor="ray") is None
    assert started_with(monkeypatch, tmp_path, yaml.safe_dump({"executor": {"kind": "ray", "workers": "two"}})) is None
    assert started_with(monkeypatch, tmp_path, yaml.safe_dump({"executor": {"kind": "ray", "cpus_per_trial": 0}})) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster: joined, not started
    assert started_with(monkeypatch, tmp_path, ray_yaml) is None


def test_the_head_uses_the_drivers_authentication_mode(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert ray_local.same_auth_mode() == {"RAY_AUTH_MODE": "disabled"}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert ray_local.same_auth_mode() == {"RAY_AUTH_MODE": "token"}


def test_a_head_that_cannot_start_says_why():
    head = ray_local.LocalRay(cpus=-1)  # Ray refuses a negative CPU count
    try:
        with pytest.raises(RuntimeError, match=r"(?s)exited 1.*Resource quantities must be nonnegative"):
            head.address()
    finally:
        head.stop()
    assert not head.temp_dir.exists()


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_the_instance_stops_when_its_driver_is_killed():
    driver = subprocess.Popen(
        [sys.executable, "-c", "import json, time\nfrom harness.ray_local import LocalRay\n"
         "head = LocalRay(1)\nhead.address()\n"
         "print(json.dumps([head.process.pid, head.port, str(head.temp_dir)]), flush=True)\n"
         "time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    log = None
    try:
        head_pid, port, log = json.loads(driver.stdout.readline())
        assert port_open(port)  # the head's GCS answers
        driver.send_signal(signal.SIGKILL)  # no finally block runs in the driver
        driver.wait()
        deadline = time.monotonic() + 60
        while (os.path.exists(f"/proc/{head_pid}") or port_open(port)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not os.path.exists(f"/proc/{head_pid}"), "the head outlived its driver"
        assert not port_open(port), "the head's GCS outlived its driver"
    finally:
        driver.kill()
        driver.wait()
        if log:  # the killed driver could not remove its head's folder
            shutil.rmtree(log, ignore_errors=True)


def raylets() -> set[int]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if "raylet" in open(f"/proc/{pid}/cmdline").read().split("\0")[0]:
                found.add(int(pid))
    return found


def ray_sessions() -> set[str]:
    """Ray's session folders in its shared temp dir, and what its ``ray_current_cluster`` says."""
    shared = Path("/tmp/ray")
    current = shared / "ray_current_cluster"
    return ({p.name for p in shared.glob("session_*")} if shared.is_dir() else set()) | \
        ({f"current: {current.read_text()}"} if current.is_file() else set())


def started_sessions(monkeypatch) -> list[Path]:
    """The session folders of every LocalRay this test process starts (their folders are removed
    at the stop: each session's logs are listed just before)."""
    found, stop = [], ray_local.LocalRay.stop

    def listing_stop(head):
        found.extend((p, sorted(os.listdir(p / "logs"))) for p in head.temp_dir.glob("session_2*"))
        stop(head)

    monkeypatch.setattr(ray_local.LocalRay, "stop", listing_stop)
    return found


STARTED = "mmpetl test: a LocalRay starts"
# ``python -m harness.cli`` saying on stderr each time a LocalRay starts
COUNTING_INSTANCES = f"""
import runpy, sys
from harness import ray_local
start = ray_local.LocalRay.__init__
def counted(self, cpus):
    print({STARTED!r}, file=sys.stderr, flush=True)
    start(self, cpus)
ray_local.LocalRay.__init__ = counted
runpy.run_module("harness.cli", run_name="__main__")
"""


@pytest.mark.slow
def test_a_ray_sweep_from_the_command_line_runs_on_its_own_instance_and_stops_it(tmp_path):
    params = small_mosi_params(tmp_path)
    params.update(datasets=["mosi"], seeds=[0, 1], grid={"mosi": [{"method": "linear"}, {"method": "wander"}]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    nodes, sessions = raylets(), ray_sessions()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", COUNTING_INSTANCES, "sweep", "--executor", "ray", "--workers", "2",
                           "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "runs"), "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["computed"] == 4
    assert len(list((tmp_path / "runs" / "mosi").glob("*.json"))) == 4
    assert done.stderr.count(STARTED) == 1  # the instance started early was joined: no second one
    assert ray_sessions() == sessions  # nothing in Ray's shared folder (ray_local's own, removed)
    assert raylets() <= nodes  # the node's processes stopped with the command


@pytest.mark.slow
def test_the_instance_runs_no_dashboard_and_leaves_no_folder(monkeypatch):
    sessions = started_sessions(monkeypatch)
    with ray_local.running(1) as head:
        head.address()
    ((session, logs),) = sessions
    assert "raylet.out" in logs and "dashboard.log" not in logs  # no API server of the dashboard ran
    assert not head.temp_dir.exists()


@pytest.mark.parametrize("address, why", [
    ("garbage", "not a host:port"), ("127.0.0.1:abc", "not a host:port"),
    ("127.0.0.1:99999", "not a host:port"), ("http://127.0.0.1:8265", "HTTP address")])
def test_a_malformed_ray_address_is_refused(monkeypatch, address, why):
    """Before: ray.init's ValueError traceback (exit 1), or Ray's 'Name or service not known' for
    the dashboard's http:// address."""
    from harness.errors import InputError
    from harness.ray_executor import check_ray_address

    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(InputError, match=why) as error:
        check_ray_address()
    assert error.value.key == "RAY_ADDRESS" and address in str(error.value)


def test_a_ray_address_nothing_answers_at_is_refused_at_once(monkeypatch):
    """ray.init retried for minutes (holding every run's lock) when RAY_ADDRESS named no head."""
    from harness.errors import InputError
    from harness.ray_executor import check_ray_address

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # closed now
    with pytest.raises(InputError, match="no Ray cluster answers") as error:
        check_ray_address()
    assert f"127.0.0.1:{port}" in str(error.value)
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # Ray resolves it
    check_ray_address()


def test_a_ray_address_where_no_grpc_server_answers_is_refused(monkeypatch):
    """An HTTP server (the dashboard's port) or a silent one: ray.init retried for minutes."""
    from harness.errors import InputError
    from harness.ray_executor import check_ray_address

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{server.server_address[1]}")
        with pytest.raises(InputError, match="not a Ray head") as error:
            check_ray_address()
        assert "its first bytes: b'" in str(error.value)  # what answered
        assert "b''" not in str(error.value)
    finally:
        server.shutdown()
    with socket.socket() as silent:  # accepts, then says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setattr("harness.ray_executor.CONNECT_TIMEOUT_S", 0.5)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(InputError, match="not a Ray head"):
            check_ray_address()


@pytest.mark.slow
def test_a_running_heads_address_passes_the_check(monkeypatch):
    from harness import ray_local
    from harness.ray_executor import check_ray_address

    with ray_local.running(1) as head:
        monkeypatch.setenv("RAY_ADDRESS", head.address())
        check_ray_address()
        monkeypatch.setenv("RAY_ADDRESS", "ray://" + head.address())
        check_ray_address()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

def test_a_bad_ray_address_stops_the_command_before_it_writes(tmp_path):
    """Before: a `.locks` folder in --out, then ray.init's traceback (exit 1)."""
    params = small_mosi_params(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for command in ("sweep", "search"):
        out = tmp_path / f"out-{command}"
        done = subprocess.run([sys.executable, "-m", "harness.cli", command, "--executor", "ray",
                               "--params", str(tmp_path / "params.yaml"), "--out", str(out)],
                              cwd=ROOT, env={**os.environ, "RAY_ADDRESS": "garbage"},
                              capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert "RAY_ADDRESS is not a host:port address" in done.stderr
        assert "Traceback" not in done.stderr
        assert not out.exists() or not any(out.iterdir())


def test_ray_address_without_the_ray_executor_is_said_to_be_ignored(tmp_path):
    params = small_mosi_params(tmp_path)
    params.update(datasets=["mosi"], seeds=[0], grid={"mosi": [{"method": "linear"}]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", "--executor", "sequential",
                           "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "runs")],
                          cwd=ROOT, env={**os.environ, "RAY_ADDRESS": "10.0.0.1:6379"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "RAY_ADDRESS is set, but the executor is sequential" in done.stderr


@pytest.mark.slow
def test_a_cluster_whose_token_the_driver_lacks_is_an_input_error(monkeypatch, tmp_path):
    """Before: Ray's AuthenticationError and ConnectionError tracebacks, exit 1."""
    params = small_mosi_params(tmp_path)
    params.update(datasets=["mosi"], seeds=[0], grid={"mosi": [{"method": "linear"}]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the head authenticates (same_auth_mode)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0123456789abcdef" * 4)
    with ray_local.running(1) as head:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
               "RAY_ADDRESS": head.address(), "RAY_AUTH_MODE": "disabled"}
        done = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", "--executor", "ray",
                               "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "runs")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "could not join the Ray cluster at RAY_ADDRESS" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "runs").glob("mosi/*.json"))


def test_a_trial_asking_for_more_gpus_than_this_machine_has_is_refused(monkeypatch):
    """On the command's own instance such a trial waited forever."""
    import torch

    from harness.errors import InputError
    from harness.ray_executor import RayOptions

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    RayOptions(gpus_per_trial=0.25).check_fits_this_machine({"cuda"})
    RayOptions(gpus_per_trial=2).check_fits_this_machine({"cpu"})  # CPU runs reserve no GPU
    with pytest.raises(InputError, match="more GPUs than this machine has") as error:
        RayOptions(gpus_per_trial=2).check_fits_this_machine({"cuda"})
    assert error.value.key == "executor.gpus_per_trial"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster: a node with more may join
    RayOptions(gpus_per_trial=2).check_fits_this_machine({"cuda"})


def test_a_node_computing_another_run_key_refuses_naming_both(monkeypatch, tmp_path):
    """A node with other code or compute packages than the driver's (README "Ray cluster", step 2)."""
    from harness import ray_executor
    from harness.errors import InputError
    from harness.run import run_key
    from harness.settings import load_params, plan_run, plan_to_dict

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_mosi_params(tmp_path)))
    plan = plan_run(load_params(tmp_path / "params.yaml"), "mosi", "linear", seed=0)
    monkeypatch.setattr(ray_executor, "node_name", lambda: "node-b (10.0.0.2)")
    drivers = "0" * 64  # the key the driver computed with its code
    with pytest.raises(InputError, match="node-b .* computes another run key") as error:
        ray_executor.compute_record(drivers, plan_to_dict(plan), str(ROOT))
    assert "000000000000" in str(error.value) and run_key(plan)[:12] in str(error.value)


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "[::1]")])
def test_an_address_answering_an_http2_settings_frame_passes(monkeypatch, family, host):
    """What a gRPC server (a Ray head's GCS) sends first; IPv6 hosts in brackets."""
    from harness.ray_executor import check_ray_address

    with socket.socket(family) as server:
        server.bind((host.strip("[]"), 0))
        server.listen()

        def answer():
            connection, _ = server.accept()
            with connection:
                connection.recv(64)
                connection.sendall(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # an empty SETTINGS frame

        threading.Thread(target=answer, daemon=True).start()
        monkeypatch.setenv("RAY_ADDRESS", f"{host}:{server.getsockname()[1]}")
        check_ray_address()
