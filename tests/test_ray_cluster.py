"""The Ray executor on a cluster: trial resources from params.yaml, batches of runs, and (slow) a
cluster of several nodes on this machine whose worker nodes have file systems of their own, one of
them killed midway through a sweep."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from harness.errors import InputError
from harness.ray_executor import RayOptions, check_node, trial_batches
from harness.settings import load_params
from harness.sweep import sweep
from helpers import ROOT, small_mosi_params


def params_with(executor: dict) -> dict:
    return {"_file": "params.yaml", "executor": {"kind": "ray", "workers": 2, **executor}}


def test_trial_resources_come_from_params_and_cuda_runs_get_a_gpu():
    options = RayOptions.from_params(params_with({"cpus_per_trial": 2, "gpus_per_trial": 0.25}))
    assert options.resources("cuda") == {"CPU": 2, "GPU": 0.25}  # four trials share one GPU
    assert options.resources("cpu") == {"CPU": 2, "GPU": 0}
    defaults = RayOptions.from_params({"_file": "params.yaml"})  # no executor section
    assert defaults.resources("cuda")["GPU"] == 1 and defaults.max_failures > 0


@pytest.mark.parametrize("key, value, expected", [
    ("gpus_per_trial", 0, "(0, 1]"), ("gpus_per_trial", 1.5, "whole number"),
    ("cpus_per_trial", "two", "> 0"), ("runs_per_trial", 0, ">= 1"),
    ("max_failures", -1, ">= 0"), ("runs_per_trial", True, ">= 1")])
def test_bad_ray_settings_name_the_key(key, value, expected):
    with pytest.raises(InputError, match=f"executor.{key}") as caught:
        RayOptions.from_params(params_with({key: value}))
    assert "params.yaml" in str(caught.value) and expected in str(caught.value)
    assert repr(value) in str(caught.value)


def test_batches_keep_one_device_and_shrink_towards_the_end():
    runs = [(f"key{i}", {"train": {"device": "cpu" if i < 6 else "cuda"}}) for i in range(9)]
    found = trial_batches(runs, workers=2, runs_per_trial=4)
    # at most the runs left over twice the workers: 9 -> 3, 6 -> 2, 4 -> 1, then one device each
    assert [[key for key, _ in batch] for batch in found] == [
        ["key0", "key1", "key2"], ["key3", "key4"], ["key5"], ["key6"], ["key7"], ["key8"]]
    assert all(len({values["train"]["device"] for _, values in batch}) == 1 for batch in found)
    assert [len(b) for b in trial_batches(runs[:4], workers=4, runs_per_trial=4)] == [1, 1, 1, 1]
    assert sum(len(b) for b in trial_batches(runs, workers=1, runs_per_trial=1)) == 9
    many = [(f"key{i}", {"train": {"device": "cpu"}}) for i in range(75)]
    sizes = [len(b) for b in trial_batches(many, workers=2, runs_per_trial=4)]
    assert sum(sizes) == 75 and max(sizes) == 4 and sizes == sorted(sizes, reverse=True)
    assert sizes[-4:] == [1, 1, 1, 1]


def test_a_node_without_the_data_names_the_path_and_the_node(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.ray_executor.node_name", lambda: "worker-7 (10.0.0.7, node abc)")
    values = {"profile": "tiny", "dataset": "mosi", "data": {"path": "datasets/nowhere/mosi"},
              "pretrained": None}
    with pytest.raises(InputError) as caught:
        check_node(values, str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path / "datasets/nowhere/mosi") in message and "worker-7 (10.0.0.7" in message
    assert "data.tiny.mosi.path" in message


# ---------------------------------------------------------------------------------------------
# A cluster on this machine: a head with no CPUs (no trial runs beside the driver) and worker
# nodes, each in a private mount namespace with tmpfs over the driver's records folder and over a
# folder only the driver has, so what a node writes there (even by absolute path) never reaches
# the driver. Every process of it runs under one private temporary folder, found by it at the end.

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_ports() -> list[str]:
    """Ports of a node's own servers, free now, so no node here meets another Ray on the machine."""
    return [f"--{name}={free_port()}" for name in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]


CLUSTER_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
               # a node that stops answering is declared dead after about 3 s (default 15-30 s)
               "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
               "RAY_health_check_failure_threshold": "3"}
OBJECT_STORE = "--object-store-memory=100000000"


class Cluster:
    def __init__(self, temp: Path, private: list[Path]):
        self.temp, self.private, self.processes = temp, private, []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start_head(self) -> None:
        self._start(["ray", "start", "--head", "--block", f"--port={self.port}", "--num-cpus=0",
                     "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp / 'head'}",
                     "--include-dashboard=false", OBJECT_STORE, *node_ports()])

    def start_worker(self, index: int) -> subprocess.Popen:
        """A worker node (2 CPUs, IP 127.0.0.<index + 1>) whose private folders are tmpfs: it
        writes a probe file into the first before Ray starts."""
        mounts = " && ".join(f'mount -t tmpfs mmpetl-node{index} "{p}"' for p in self.private)
        script = f'{mounts} && touch "{self.private[0]}/written-on-worker-node" && exec "$@"'
        return self._start(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                            "ray", "start", "--block", f"--address={self.address}", "--num-cpus=2",
                            f"--node-ip-address=127.0.0.{index + 1}",
                            f"--temp-dir={self.temp / f'node{index}'}", OBJECT_STORE, *node_ports()])

    def _start(self, command: list[str]) -> subprocess.Popen:
        log = open(self.temp / f"start-{len(self.processes)}.log", "w")
        process = subprocess.Popen(command, env=CLUSTER_ENV, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log.close()
        self.processes.append(process)
        return process

    def wait_for_cpus(self, cpus: int, timeout: float = 120) -> None:
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(int(ray.cluster_resources().get('CPU', 0)))")
        deadline = time.time() + timeout
        while True:
            try:
                done = subprocess.run([sys.executable, "-c", probe, self.address], capture_output=True,
                                      text=True, env=CLUSTER_ENV, timeout=30)
                if done.returncode == 0 and done.stdout.strip() == str(cpus):
                    return
            except subprocess.TimeoutExpired:  # the head still starting
                pass
            assert time.time() < deadline, f"the cluster never had {cpus} CPUs:\n{self.logs()}"
            assert self.processes[0].poll() is None, f"the Ray head exited:\n{self.logs()}"
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(path.read_text()[-1500:] for path in sorted(self.temp.glob("start-*.log")))

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def stop(self) -> None:
        """Stop everything this cluster started: each node's process group, then any process whose
        command line names this cluster's temporary folder (workers Ray started in sessions of
        their own), by id."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()  # `ray start --block` stops its node on SIGTERM
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            self.kill(process)
        marker = str(self.temp).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass


def metrics_by_run(out_dir: Path) -> dict:
    found = {}
    for path in out_dir.glob("mosi/*.json"):
        record = json.loads(path.read_text())
        found[(json.dumps(record["row"], sort_keys=True), record["seed"])] = record["metrics"]
    return found


@pytest.mark.slow
def test_sweep_on_a_cluster_survives_a_lost_node_and_brings_every_record_home(tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root (a private mount namespace per worker node)")
    params = small_mosi_params(tmp_path)
    params.update(datasets=["mosi"], seeds=[0, 1])
    # runs long enough (1-3 s each) that both trials are still computing when the node is
    # killed, right after the first record came home (the first trials take two runs each): with
    # short runs a node could finish its trials before the kill, and nothing would be lost to
    # retry (a race the CI dry runs hit, with 1-epoch runs and, on a faster machine, 12 epochs)
    params["profiles"]["tiny"]["train"] = {"epochs": 40, "batch_size": 16}
    params["grid"] = {"mosi": [{"method": "linear"}, {"method": "lora", "rank": 4},
                               {"method": "wander", "down_dim": 8}, {"method": "adapter", "down_dim": 8}]}
    params["executor"] = {"kind": "ray", "workers": 2, "cpus_per_trial": 1, "runs_per_trial": 4,
                          "max_failures": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # the same data in a folder only the driver has: the nodes must refuse it, naming path and node
    driver_only = tmp_path / "driver-only"
    shutil.copytree(tmp_path / "mosi", driver_only / "mosi")
    params["data"]["tiny"]["mosi"]["path"] = str(driver_only / "mosi")
    (tmp_path / "params-driver-only.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "runs"
    out.mkdir()

    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = Cluster(temp, [out, driver_only])
    drivers = []
    try:
        cluster.start_head()
        first = cluster.start_worker(1)
        # the reference while the nodes start: the sequential executor, in this process
        sequential = sweep(load_params(tmp_path / "params.yaml"), "sequential", 1, tmp_path / "sequential")
        assert sequential["computed"] == 8
        cluster.wait_for_cpus(2)
        assert (tmp_path / "sequential").is_dir() and not (out / "written-on-worker-node").exists()

        env = {**CLUSTER_ENV, "RAY_ADDRESS": cluster.address}
        command = [sys.executable, "-m", "harness.cli", "sweep", "--executor", "ray", "--json"]
        driver = subprocess.Popen(command + ["--params", str(tmp_path / "params.yaml"), "--out", str(out)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        drivers.append(driver)
        deadline = time.time() + 180
        while not list(out.glob("mosi/*.json")):  # midway: a first record home, its trial running
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.time() < deadline, "no record came home"
            time.sleep(0.05)
        cluster.kill(first)  # the node and its mount namespace are gone, with the trials on it
        assert len(list(out.glob("mosi/*.json"))) < 8, "the sweep ended before the node was lost"
        cluster.start_worker(2)
        stdout, stderr = driver.communicate(timeout=240)
        assert driver.returncode == 0, stderr[-3000:]
        summary = json.loads(stdout)
        assert summary["computed"] == 8
        assert summary["ray"]["trials_retried"] >= 1  # the lost trials ran again, on node 2
        # every record came home exactly once: no finished run of a lost trial was run again
        assert summary["ray"] == {**summary["ray"], "records_received": 8, "duplicates": 0}
        assert len(list(out.glob("mosi/*.json"))) == 8
        assert metrics_by_run(out) == metrics_by_run(tmp_path / "sequential")
        again = subprocess.run(command + ["--params", str(tmp_path / "params.yaml"), "--out", str(out)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        resumed = json.loads(again.stdout)  # records home are not resubmitted
        assert resumed["computed"] == 0 and resumed["ray"]["records_received"] == 0

        refused = subprocess.run(command + ["--params", str(tmp_path / "params-driver-only.yaml"),
                                            "--out", str(tmp_path / "refused")],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert str(driver_only / "mosi") in refused.stderr and "127.0.0.3" in refused.stderr
        assert not list((tmp_path / "refused").glob("mosi/*.json"))
    finally:
        for driver in drivers:
            if driver.poll() is None:
                driver.kill()
                driver.communicate()
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)
