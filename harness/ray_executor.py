"""Ray Tune executor: the same trial function as the other executors, on one machine or a cluster.

Ray itself is imported only when the ``ray`` executor is chosen. ``ray.init`` joins the cluster named by
RAY_ADDRESS when it is set (``RAY_ADDRESS=... dvc repro``), else a local instance of the command's
own (``harness/ray_local.py``: started as the command starts, so it comes up while the driver imports).
Tune's storage lives inside the results folder, not ~/ray_results.

On a cluster nothing depends on a worker node's disk:

- Results come home. A trial runs its runs in a scratch folder of its own and hands each run's
  whole record to the driver in its Tune result (one JSON string: Tune neither flattens its
  hundred-odd fields nor prints them in its trial tables); the driver writes it atomically into the
  records folder (``RecordsHome``) as soon as it arrives. A trial lost with its node is retried
  (``max_failures``): before the retry starts, the driver opens a ``Ledger`` actor pinned to its
  own node and holding the keys of every record that came home (and of those coming after); the
  retry asks it which of its runs to skip, so no finished run is computed twice. A sweep without
  a lost trial starts no ledger (one process fewer on a small machine).
- Code and data. Every node runs the project installed at the same revision (the worker computes
  each run's key and refuses to run when it differs from the driver's: other code or compute
  packages), and reads the project folder, its data and checkpoints at the driver's paths (a
  shared file system); a node that lacks one fails naming the path and the node.
- Bad input fails once. A run raising ``InputError`` on a node is reported as a result (not a
  trial error, which Tune would retry), stops the sweep, and is raised again on the driver.
- Stops. Ctrl-C or SIGTERM on the driver asks Tune to end its trials; the command then exits 130 /
  143 and the same command resumes (a second signal stops at once). RAY_ADDRESS is checked
  before anything is written (``check_ray_address``), a progress bar counts the records home.
- Resources. Each trial reserves ``cpus_per_trial`` CPUs and, when its runs train on
  ``device: cuda``, ``gpus_per_trial`` GPUs (a fraction packs several trials on one GPU); Ray then
  sets CUDA_VISIBLE_DEVICES in the trial's worker. ``runs_per_trial`` runs share one trial, so
  Tune's fixed cost per trial is paid once per batch.

Two entry points: ``run_with_ray`` runs a fixed list of plans (the finetune grid, in batches);
``search_with_ray`` lets Ray's ``OptunaSearch`` ask an Optuna study for each trial's settings
(the rank search), the same study (journal storage) the other executors drive.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from harness import concurrency, ray_local, records
from harness.errors import InputError
from harness.run import run_key, run_trial
from harness.settings import plan_from_dict, plan_to_dict

# The params.yaml ``executor`` keys of this executor, with their defaults.
RAY_DEFAULTS = {"cpus_per_trial": 1, "gpus_per_trial": 1, "runs_per_trial": 4, "max_failures": 3}


@dataclass(frozen=True)
class RayOptions:
    """What each trial reserves and how faults are handled (params.yaml ``executor``)."""
    cpus_per_trial: float = RAY_DEFAULTS["cpus_per_trial"]
    gpus_per_trial: float = RAY_DEFAULTS["gpus_per_trial"]  # reserved by device: cuda runs only
    runs_per_trial: int = RAY_DEFAULTS["runs_per_trial"]
    max_failures: int = RAY_DEFAULTS["max_failures"]  # retries of a trial lost with its node

    @classmethod
    def from_params(cls, params: dict) -> RayOptions:
        """The ``executor`` section's Ray keys (defaults for those absent), each checked."""
        section = params.get("executor") or {}
        file = params.get("_file")
        values = {name: section.get(name, default) for name, default in RAY_DEFAULTS.items()}
        checks = {
            "cpus_per_trial": (lambda v: v > 0, "a number > 0 (e.g. 1 or 0.5)"),
            # a fraction packs several trials on one GPU; above 1, whole GPUs (Ray's rule)
            "gpus_per_trial": (lambda v: v > 0 and (v <= 1 or float(v).is_integer()),
                               "a fraction in (0, 1] or a whole number of GPUs"),
            "runs_per_trial": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
            "max_failures": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
        }
        for name, (rule, expected) in checks.items():
            value = values[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not rule(value):
                raise InputError("invalid Ray executor setting", file=file, key=f"executor.{name}",
                                 expected=expected, found=repr(value))
        return cls(**values)

    def local_cpus(self, workers: int) -> int:
        """The CPUs of the command's own instance (no RAY_ADDRESS): ``workers`` trials at once of
        ``cpus_per_trial`` each (Ray's CPUs are a count of slots, not cores)."""
        return ray_local.local_cpus(workers, self.cpus_per_trial)

    def check_fits_this_machine(self, devices: set[str]) -> None:
        """On the command's own instance (no RAY_ADDRESS), which has this machine's GPUs, a trial of
        ``device: cuda`` runs asking for more would wait forever; on a cluster it waits, as a node
        with more may join."""
        if "cuda" not in devices or os.environ.get("RAY_ADDRESS"):
            return
        import torch

        found = torch.cuda.device_count()
        if self.gpus_per_trial > found:
            raise InputError("a trial asks for more GPUs than this machine has (the ray executor "
                             "without RAY_ADDRESS runs on this machine)", key="executor.gpus_per_trial",
                             expected=f"at most {found} (this machine's GPUs)", found=self.gpus_per_trial)

    def resources(self, device: str) -> dict:
        """What one trial of runs on ``device`` reserves: CPUs, and GPUs for ``cuda``."""
        return {"CPU": self.cpus_per_trial, "GPU": self.gpus_per_trial if device == "cuda" else 0}


def trial_batches(keyed_values: list[tuple[str, dict]], workers: int,
                  runs_per_trial: int) -> list[list]:
    """The runs split into trials of consecutive runs of one device: ``[[(key, plan values), ...],
    ...]``. Each trial takes at most ``runs_per_trial`` runs and at most the runs left over twice
    the workers, so trials shrink to one run towards the end: Tune starts them in order, and the
    last trials finish together instead of one worker running a whole batch while the other idles."""
    found, current, size = [], [], 0
    for index, (key, values) in enumerate(keyed_values):
        device = values["train"]["device"]
        if current and (len(current) == size or current[-1][1]["train"]["device"] != device):
            found.append(current)
            current = []
        if not current:
            left = len(keyed_values) - index
            size = max(1, min(runs_per_trial, math.ceil(left / (2 * max(1, workers)))))
        current.append((key, values))
    return found + [current] if current else found


@contextlib.contextmanager
def ray_session(cpus: int):
    """Ray, initialised here unless the caller already did (then left running): the cluster named by
    RAY_ADDRESS, else a local instance of this command's own with ``cpus`` CPUs
    (``RayOptions.local_cpus``; ``ray_local``: the one the command started early, or one started now). Workers started by a cluster's nodes get the user's method
    modules (MMPETL_METHODS) through the runtime env."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # no per-trial CSV / JSON / TensorBoard logs from Tune: the run records hold every result, and
    # writing them costs CPU that the trials compete for on a small machine
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # ... so Tune's result grid finds no trial's result.json / progress.csv and would warn about each
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # SIGINT stays the sweep's (``_fit``: a stop ends the trials, then the command exits 130)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune's reporter of before Ray 2.5, silent at verbose 0 (the new one prints the experiment's
    # configuration even then): the sweep's progress bar says how far it is
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    import ray

    from methods.registry import ENV_MODULES

    with contextlib.ExitStack() as stack:
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")  # checked by the caller (check_ray_address)
            if not address:
                address = stack.enter_context(ray_local.instance(cpus)).address()
            modules = os.environ.get(ENV_MODULES)
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                         runtime_env={"env_vars": {ENV_MODULES: modules}} if modules else None)
            except ConnectionError as error:
                raise could_not_join(address, error) from None
            # leave no Ray driver behind (a later `ray stop` would kill this process); the local
            # instance stops after it
            stack.callback(ray.shutdown)
        yield


# How long a cluster's head may take to answer before RAY_ADDRESS is called wrong (ray.init
# itself retries for minutes, holding every run's lock meanwhile)
CONNECT_TIMEOUT_S = 10.0
# A client's HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113, 3.4): a gRPC server,
# as Ray's GCS and Ray Client server are, answers with a SETTINGS frame (type 4) of its own
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SETTINGS_FRAME = 4
RAY_ADDRESS_EXPECTED = ("the address of a running Ray head: host:port of its GCS (`ray start --head` "
                        "prints it; port 6379 by default) or ray://host:port (Ray Client), or "
                        "RAY_ADDRESS unset for a local instance")


def check_ray_address() -> None:
    """When RAY_ADDRESS is set: InputError unless it is a head's address that answers in gRPC
    within CONNECT_TIMEOUT_S (``auto`` and ``local`` are Ray's to resolve). Checked before the
    sweep takes its runs' locks; ray.init would retry for minutes on a closed port or on an HTTP
    server (the dashboard's port), and raise a bare ValueError on a malformed address."""
    address = os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return

    def refuse(why: str, found: str = address):
        return InputError(why, key="RAY_ADDRESS", expected=RAY_ADDRESS_EXPECTED, found=found)

    if address.startswith(("http://", "https://")):
        raise refuse("RAY_ADDRESS is an HTTP address (the dashboard's, which `ray job submit` "
                     "takes): a sweep's driver joins the head's GCS")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise refuse("RAY_ADDRESS is not a host:port address")
    try:
        # an IPv6 host is written in brackets: [::1]:6379
        connection = socket.create_connection((host.removeprefix("[").removesuffix("]"), int(port)),
                                              timeout=CONNECT_TIMEOUT_S)
    except OSError as error:
        raise refuse("no Ray cluster answers at RAY_ADDRESS",
                     f"{address} ({type(error).__name__}: {error})") from None
    reply = b""
    with connection, contextlib.suppress(OSError):  # silence or a reset: no gRPC server either
        connection.sendall(HTTP2_PREFACE)
        while len(reply) < 9 and (part := connection.recv(9 - len(reply))):
            reply += part
    if len(reply) < 9 or reply[3] != SETTINGS_FRAME:
        raise refuse("something answers at RAY_ADDRESS, but not a Ray head (it does not speak "
                     "gRPC)", f"{address} (its first bytes: {reply[:16]!r})")


def could_not_join(address: str, error: Exception) -> InputError:
    """ray.init's failure to join a head that answers (``check_ray_address`` found it there), as an
    input error naming RAY_ADDRESS: most often a cluster with token authentication, whose token
    the driver lacks (Ray's log above says so)."""
    return InputError("could not join the Ray cluster at RAY_ADDRESS", key="RAY_ADDRESS",
                      expected="a head this driver may join: with token authentication on the "
                               "cluster, RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, "
                               "or ~/.ray/auth_token) in the driver's environment, as on its nodes",
                      found=f"{address}: {str(error).strip().splitlines()[0][:300]}")


def node_name() -> str:
    """This Ray node, as a message names it: host, IP and the start of its node id."""
    import ray

    return (f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, "
            f"node {ray.get_runtime_context().get_node_id()[:12]})")


def missing_on_node(what: str, path: Path, key: str | None) -> InputError:
    return InputError(f"{what} is not on Ray node {node_name()}: every node must read it at the "
                      "driver's path (a shared file system)", file=str(path), key=key,
                      expected="a path every node reads", found="nothing there")


def enter_project(root: str) -> None:
    """Work in the project folder the sweep was started in (paths in plans are relative to it)."""
    if not Path(root).is_dir():
        raise missing_on_node("the project folder (the sweep's working directory)", Path(root), None)
    os.chdir(root)


def check_node(values: dict, root: str) -> None:
    """Refuse to run on a node that lacks the data or the checkpoint at the driver's paths (they
    must come from a file system every node reads)."""
    needed = [("the data", values["data"]["path"], f"data.{values['profile']}.{values['dataset']}.path")]
    if values.get("pretrained"):
        needed.append(("the pre-training checkpoint", values["pretrained"]["path"],
                       f"pretrain.use.{values['dataset']}"))
    for what, path, key in needed:
        if not (Path(root) / path).exists():
            raise missing_on_node(what, Path(root) / path, key)


def compute_record(key: str | None, values: dict, root: str) -> dict:
    """Run one plan on this node, in a scratch folder removed afterwards, and return its record.
    ``key``: the run key the driver computed; a node computing another one runs other code or
    other compute packages and refuses."""
    enter_project(root)
    check_node(values, root)
    local = run_key(plan_from_dict(values))
    if key is not None and local != key:
        raise InputError(f"Ray node {node_name()} computes another run key for "
                         f"{records.row_slug(values['row'])} seed {values['seed']}: its code (harness "
                         "or methods) or compute packages differ from the driver's; install the "
                         "driver's revision on every node", expected=f"the driver's run key {key[:12]}",
                         found=local[:12])
    scratch = tempfile.mkdtemp(prefix="mmpetl-trial-")
    try:
        return run_trial(values, scratch, root)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _open_ledger(name: str, done: set[str]):
    """The named ``Ledger`` actor on the driver's node (it outlives any worker node), holding
    ``done``: the run keys whose records reached the driver, for a retried trial to skip."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class Ledger:
        def __init__(self, done: set[str]):
            self.done = set(done)

        def mark(self, key: str) -> None:
            self.done.add(key)

        def which_done(self, keys: list[str]) -> list[str]:
            return [k for k in keys if k in self.done]

    ledger = Ledger.options(name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)).remote(done)
    ray.get(ledger.which_done.remote([]))  # up before the retried trial asks for it
    return ledger


def runs_done(ledger_name: str, keys: list[str]) -> set[str]:
    """Which of ``keys`` came home already: none unless a trial was retried (no ledger yet)."""
    import ray

    try:
        ledger = ray.get_actor(ledger_name)
    except ValueError:
        return set()
    return set(ray.get(ledger.which_done.remote(keys)))


def _records_home(path_for, ledger_name: str | None, progress: tqdm):
    """A Tune callback (in the driver) that writes each record a trial reports atomically at
    ``path_for(trial config, record)``, counts it on the ``progress`` bar, and keeps what the sweep
    reports: records received, duplicates (a key received twice), trials retried, the first bad
    input. With ``ledger_name``, a retried trial opens the ledger of received keys, which then notes
    every later one."""
    import ray
    from ray.tune import Callback

    class RecordsHome(Callback):
        def __init__(self, progress: tqdm):  # an argument: Tune pickles the class, not the bar
            self.received, self.duplicates, self.retried, self.input_error = set(), 0, 0, None
            self.ledger = None
            self.progress = progress

        def __getstate__(self):  # Tune pickles its run configuration, callbacks included
            return {name: value for name, value in self.__dict__.items() if name != "progress"}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "input_error" in result and self.input_error is None:
                self.input_error = result["input_error"]
            if "record" not in result:
                return
            record = json.loads(result["record"])
            records.write_json_atomic(path_for(trial.config, record), record)
            if record["key"] in self.received:
                self.duplicates += 1
            self.received.add(record["key"])
            self.progress.update()
            if self.ledger is not None:
                ray.get(self.ledger.mark.remote(record["key"]))

        def on_trial_recover(self, iteration, trials, trial, **info):
            # Tune calls this before its loop starts the requeued trial: the ledger is up in time
            self.retried += 1
            if ledger_name is not None and self.ledger is None:
                self.ledger = _open_ledger(ledger_name, self.received)

        def summary(self) -> dict:
            return {"records_received": len(self.received), "duplicates": self.duplicates,
                    "trials_retried": self.retried}

    return RecordsHome(progress)


def _stop_on_input_error(home):
    from ray.tune import Stopper

    class StopOnInputError(Stopper):
        """Stops every trial once a bad input came back: it would fail the same way on any node."""

        def __call__(self, trial_id, result):
            return "input_error" in result

        def stop_all(self):
            return home.input_error is not None

    return StopOnInputError()


# What Tune logs when its loop is stopped (ray/tune/tune.py)
TUNE_STOP_MESSAGES = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete")


@contextlib.contextmanager
def _without_tune_stop_messages(received: list):
    """Tune's log without its messages about a stop once a stop signal was ``received``."""
    def keep(record: logging.LogRecord) -> bool:
        return not (received and str(record.msg).startswith(TUNE_STOP_MESSAGES))

    logger = logging.getLogger("ray.tune.tune")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _fit(trainable, name: str, storage: Path, workers: int, options: RayOptions, resources_for,
         home, **tune_config) -> dict:
    """Run the trials, each reserving ``resources_for(config)``; raise the first bad input as an
    InputError and trials that failed for good as a RuntimeError; return ``home``'s summary."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(trainable, lambda config: tune.PlacementGroupFactory([resources_for(config)])),
        param_space=tune_config.pop("param_space", None),
        # reuse_actors: a worker process (torch, harness imported) runs trial after trial instead of
        # one fresh process per trial; Tune's default (False) costs seconds per tiny trial.
        tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=True, **tune_config),
        # verbose 0: no trial tables (the progress bar counts records home; errors are still logged)
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[home],
                                  stop=_stop_on_input_error(home),
                                  failure_config=tune.FailureConfig(max_failures=options.max_failures)),
    )
    # SIGINT / SIGTERM: Tune's own stop (SIGUSR1 ends its loop and its trials), then Stopped; Tune's
    # messages about it go, as its advice to resume with Tuner.restore (the same command resumes)
    with concurrency.stop_when_asked(lambda: os.kill(os.getpid(), signal.SIGUSR1)) as received, \
            _without_tune_stop_messages(received):
        results = tuner.fit()
    if home.input_error is not None:
        raise InputError(home.input_error)  # the node's whole message: file, key, expected, found
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} Ray trials failed after {options.max_failures} retries; "
                           f"first: {errors[0]}")
    return home.summary()


def run_with_ray(keyed_values: list[tuple[str, dict]], root: str, workers: int, storage: Path,
                 options: RayOptions, path_for) -> dict:
    """Run the plans ``keyed_values`` ([(run key, plan values)]; paths relative to ``root``) as Tune
    trials of ``options.runs_per_trial`` runs; each record is written on the driver at
    ``path_for(key)``. Returns what came back (``RecordsHome.summary``)."""
    from ray import tune

    options.check_fits_this_machine({values["train"]["device"] for _, values in keyed_values})
    trials = trial_batches(keyed_values, workers, options.runs_per_trial)
    ledger_name = f"mmpetl-ledger-{uuid.uuid4().hex}"

    with ray_session(options.local_cpus(workers)), \
            tqdm(total=len(keyed_values), desc="sweep (ray)", unit="run") as progress:
        # A trial's config is its batch's index: the plans travel once, with the function, and
        # Tune's driver names, stores and checkpoints small configs.
        def trainable(config: dict) -> None:
            batch = trials[config["batch"]]
            done = runs_done(ledger_name, [key for key, _ in batch])
            with records.inputs_fixed():  # the batch's runs hash the data and code once
                for key, values in batch:
                    if key in done:  # came home before this trial was lost with its node
                        continue
                    try:
                        record = compute_record(key, values, root)
                    except InputError as error:
                        tune.report({"input_error": str(error)})
                        return
                    tune.report({"record": json.dumps(record)})

        home = _records_home(lambda config, record: path_for(record["key"]), ledger_name, progress)
        return _fit(trainable, "finetune", storage, workers, options,
                    lambda config: options.resources(trials[config["batch"]][0][1]["train"]["device"]),
                    home, param_space={"batch": tune.grid_search(list(range(len(trials))))})


def search_with_ray(study_name: str, journal, sampler, directions: list[str], space: dict[str, list],
                    trials: int, plan_for, metric: str, out_dir: str, root: str, workers: int,
                    storage: Path, options: RayOptions) -> dict:
    """Run ``trials`` more trials of the Optuna study ``study_name`` in ``journal`` (two
    objectives: the validation ``metric`` and the #tunable, in ``directions``), each asked by
    Ray's OptunaSearch over the categorical ``space`` with ``sampler`` and turned into a plan by
    ``plan_for(settings)``, at most ``workers`` at a time; records come home into ``out_dir``."""
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from harness.run import record_path

    # the device is a train setting, the same for every searched setting
    options.check_fits_this_machine({plan_for({name: choices[0] for name, choices in space.items()}).train.device})

    def trainable(config: dict) -> None:
        try:
            enter_project(root)  # plan_for resolves the data and checkpoint paths
            with records.inputs_fixed():  # the run's key is asked for several times
                record = compute_record(None, plan_to_dict(plan_for(config)), root)
        except InputError as error:
            tune.report({"input_error": str(error)})
            return
        tune.report({"record": json.dumps(record), metric: record["valid_metrics"][metric],  # on validation
                     "tunable": record["tunable"]["method"] + record["tunable"]["head"]})

    searcher = OptunaSearch(
        space={name: optuna.distributions.CategoricalDistribution(choices)
               for name, choices in space.items()},
        metric=[metric, "tunable"],
        mode=[direction[:3] for direction in directions],  # minimize -> min, maximize -> max
        sampler=sampler, study_name=study_name, storage=journal)
    with ray_session(options.local_cpus(workers)), \
            tqdm(total=trials, desc="search (ray)", unit="trial") as progress:
        home = _records_home(lambda config, record: record_path(
            plan_for(config), record["key"], Path(out_dir)), None, progress)
        return _fit(trainable, f"search-{study_name}", storage, workers, options,
                    lambda config: options.resources(plan_for(config).train.device), home,
                    search_alg=ConcurrencyLimiter(searcher, max_concurrent=workers), num_samples=trials)
