"""The ``mmpetl`` command line. ``--json`` prints one JSON document on
stdout; logs and progress go to stderr. Bad input exits 2 with a message naming what is wrong."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import sys
from pathlib import Path

from harness.errors import InputError


# With --json, stdout carries the one JSON document only: anything else printed while a command
# runs (Ray Tune's status tables, library chatter) is sent to stderr, and _emit writes here.
_json_stdout = None


def _emit(document, as_json: bool, render) -> None:
    if as_json:
        from harness.records import dumps_strict

        stream = _json_stdout or sys.stdout
        stream.write(dumps_strict(document, indent=2) + "\n")  # strict JSON: NaN -> null + reason
    else:
        render(document)


def _use_threads(params: dict | None) -> int:
    """The thread policy (``harness.train.thread_count``): params.yaml ``threads`` for the
    profile, OMP_NUM_THREADS when set; ``None`` (audit, cost: small models) as the tiny profile."""
    from harness.train import use_threads

    if params is None:
        return use_threads()
    return use_threads(params.get("threads", "auto"), params["profile"], params.get("_file"))


def cmd_methods(args) -> int:
    from methods import get_method, method_names, method_origin

    if Path(args.params).is_file() or args.params != "params.yaml":
        from harness.settings import load_params

        load_params(args.params)  # imports the modules listed under ``methods``
    document = []
    for name in method_names():
        spec = get_method(name)
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(spec.config_class)}
        document.append({
            "name": name, "summary": spec.summary, "modalities": spec.modalities,
            "variants": list(spec.variants), "config": defaults,
            "variant_details": {v: dataclasses.asdict(d) for v, d in spec.variants.items()},
            "origin": method_origin(name),
        })

    def render(rows):
        for row in rows:
            origin = row["origin"]
            where = "  [built-in]" if origin["source"] == "built-in" else (
                f"  [{origin['source']}: {origin['module']}, {origin['file']}]")
            print(f"{row['name']:<11} variants: {', '.join(row['variants']):<12} {row['summary']}"
                  f"{where}")

    _emit(document, args.json, render)
    return 0


def cmd_audit(args) -> int:
    from harness.audit import audit_grads

    _use_threads(None)

    _load_params_methods(args)
    if args.out:
        from harness.records import require_writable_file

        require_writable_file(args.out, "--out")  # before the audit runs
    if args.what == "params":
        from harness.audit_params import PAPER_ROWS, audit_params, audit_params_markdown

        rows = audit_params(rows=tuple(r for r in PAPER_ROWS if not args.method or r.method in args.method))
        _emit_audit(rows, args, lambda r: print(audit_params_markdown(r)))
        return 0
    if args.what == "grads":
        rows = audit_grads(args.method or None)

        def render(rows):
            for r in rows:
                status = "ok" if r["ok"] else "FAIL"
                note = f"  flagged: {r['flag']}" if r["flag"] else ""
                mixing = r.get("batch_dependence")
                mixing = "-" if mixing is None else f"{mixing:.1e}" + (
                    " (expected: mixes the batch)" if r.get("batch_mixing_expected") else "")
                print(f"{status:<4} {r['method']:<11} {r['variant']:<6} "
                      f"{r.get('backbone', 'late_fusion'):<11} M={r['modalities']} "
                      f"method={r['trainable_method']:>7} head={r['trainable_head']:>7} "
                      f"dead={len(r['dead_tensors'])} identity={r['identity_at_init']} "
                      f"batch-dependence={mixing}{note}")

        _emit_audit(rows, args, render)
        return 0 if all(r["ok"] for r in rows) else 1
    raise InputError("unknown audit", key="audit", expected="grads or params", found=args.what)


def _emit_audit(rows, args, render) -> None:
    """An audit's rows: JSON written atomically to ``--out`` (a stopped audit leaves the previous
    file whole), else printed (``--json``: as JSON)."""
    if args.out:
        from harness.records import write_json_atomic

        write_json_atomic(args.out, rows)
    else:
        _emit(rows, args.json, render)


def _parse_sets(pairs: list[str] | None) -> dict[str, str]:
    overrides = {}
    for pair in pairs or []:
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise InputError("bad --set", key=pair, expected="key=value", found=pair)
        if key in overrides:
            raise InputError("--set gives a key twice", key=key, expected="each key once",
                             found=f"{overrides[key]!r} and {value!r}")
        overrides[key] = value
    return overrides


# Where `mmpetl run` writes a record it computes unless --out says otherwise: outside the committed
# study (results/runs, the finetune stage's output), ignored by git
SCRATCH_RUNS = ".mmpetl/runs"


def _run_defaults(params: dict, dataset: str, method: str) -> dict | None:
    """params.yaml ``run_defaults.<method>.<dataset>``: the method's main setting on the dataset."""
    block = params.get("run_defaults") or {}
    settings = (block.get(method) or {}).get(dataset) if isinstance(block, dict) else None
    if settings is not None and not isinstance(settings, dict):
        raise InputError("expected a mapping of config fields", file=params.get("_file"),
                         key=f"run_defaults.{method}.{dataset}", expected="e.g. {down_dim: 16}",
                         found=repr(settings))
    return dict(settings) if settings else None


def cmd_run(args) -> int:
    from harness import records

    with records.inputs_fixed():  # the record's code and data hashes are its key's, edits meanwhile aside
        return _run_command(args)


def _run_command(args) -> int:
    from harness import concurrency
    from harness.records import read_run_record
    from harness.run import RUNS_DIR, execute, record_path, run_key
    from harness.settings import load_params, plan_run
    from harness.sweep import check_can_compute

    params = load_params(args.params)
    _use_threads(params)
    plan = plan_run(params, args.dataset, args.method, args.variant, args.seed, _parse_sets(args.set),
                    settings=_run_defaults(params, args.dataset, args.method))
    key, out = run_key(plan), Path(args.out)
    found = next((path for path in (record_path(plan, key, out), record_path(plan, key, RUNS_DIR))
                  if path.exists()), None)
    if found is None:  # under the run's locks: a sweep or run computing it now is waited for
        path, study = record_path(plan, key, out), record_path(plan, key, RUNS_DIR)
        check_can_compute([plan], out)  # before the lock file is written under ``out``
        with contextlib.ExitStack() as held:
            if out.resolve() != RUNS_DIR.resolve() and os.access(RUNS_DIR, os.W_OK):
                held.enter_context(concurrency.record_lock(RUNS_DIR, study))  # a sweep of the study
            held.enter_context(concurrency.record_lock(out, path))
            found = next((p for p in (path, study) if p.is_file()), None)
            if found is None:
                with concurrency.stop_on_signals("nothing was recorded; the same command "
                                                 "computes the run again"):
                    record = execute(plan, out, progress=not args.json)
    if found is not None:  # the same key: the same run, already recorded
        record = read_run_record(found)
    where = found or record_path(plan, key, out)
    status = {"reused": found is not None, "record": str(where)}

    def render(r):
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(r["metrics"].items()))
        row = ", ".join(f"{k}={v}" for k, v in r["row"].items() if k not in ("method", "variant"))
        print(("reused the record " + str(where) + " (same run key: nothing computed)")
              if found is not None else f"computed in {r['wall_s']:.1f} s; record written to {where}")
        print(f"{r['dataset']} {r['method']}/{r['variant']} {row} seed {r['seed']} "
              f"(tunable method={r['tunable']['method']} head={r['tunable']['head']}, "
              f"epoch {r['selected_epoch']} selected on valid {r['select_metric']})\ntest: {metrics}")

    _emit({**record, "run_status": status}, args.json, render)
    return 0


def _executor(args, params: dict) -> tuple[str, int | None]:
    """The executor and its workers: the command line's, else params.yaml's ``executor``."""
    kind, workers = _executor_choice(args, params)
    if kind == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            origin = ("command line", "--executor") if args.executor else (args.params, "executor.kind")
            raise InputError('the ray executor needs Ray: pip install -e ".[ray]"', file=origin[0],
                             key=origin[1], expected="ray importable", found="no module ray") from None
        from harness.ray_executor import check_ray_address

        check_ray_address()  # before any lock or record: ray.init would retry for minutes
    elif os.environ.get("RAY_ADDRESS"):
        print(f"mmpetl: RAY_ADDRESS is set, but the executor is {kind}: the runs stay on this "
              "machine (executor.kind: ray in the params file, or --executor ray, runs them on the "
              "cluster)", file=sys.stderr)
    return kind, workers


def _executor_choice(args, params: dict) -> tuple[str, int | None]:
    """The command line's executor and workers, else those of the params' ``executor`` section."""
    configured = params.get("executor") or {}
    return args.executor or configured.get("kind", "sequential"), args.workers or configured.get("workers")


def _seed_option(text: str) -> int:
    """A ``--seed`` value: an integer in numpy's seed range."""
    from harness.params_schema import SEED_MAX

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}], found {text!r}")
    return value


def _positive_option(text: str) -> int:
    """A count (``--workers``, ``--batch-size``): an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, found {text!r}")
    return value


def _ray_started_early(args):
    """With the ray executor (the command line's, else the params file's ``executor.kind``), Ray
    installed and no RAY_ADDRESS: the command's own local Ray instance, starting now, before the
    harness and torch import (``ray_local``), with the CPUs of ``--workers`` (else
    ``executor.workers``, else the machine's) trials of ``executor.cpus_per_trial``. Otherwise
    nothing. A params file that cannot be read here starts nothing: ``load_params`` reports what
    is wrong with it."""
    import importlib.util
    import os

    import yaml

    try:
        params = yaml.safe_load(Path(args.params).read_text())
        kind, workers = _executor_choice(args, params)
        per_trial = (params.get("executor") or {}).get("cpus_per_trial", 1)
    except (OSError, ValueError, yaml.YAMLError, AttributeError):  # ValueError: not UTF-8
        return contextlib.nullcontext()
    workers = workers or os.cpu_count() or 1
    def positive(value, kinds) -> bool:
        return not isinstance(value, bool) and isinstance(value, kinds) and value > 0

    if (kind != "ray" or os.environ.get("RAY_ADDRESS") or importlib.util.find_spec("ray") is None
            or not positive(workers, int) or not positive(per_trial, (int, float))):
        return contextlib.nullcontext()
    from harness.ray_local import local_cpus, started_early

    return started_early(local_cpus(workers, per_trial))


def cmd_sweep(args) -> int:
    with _ray_started_early(args):
        return _sweep_command(args)


def _sweep_command(args) -> int:
    from harness.settings import load_params
    from harness.sweep import sweep, write_index

    params = load_params(args.params)
    _use_threads(params)
    summary = sweep(params, *_executor(args, params), Path(args.out))
    write_index(Path(args.out), summary)
    _emit(summary, args.json, lambda s: print(
        f"{s['runs']} runs: {s['computed']} computed, {s['reused']} already recorded"
        + (f" ({s['restored']} moved back from .stale)" if s["restored"] else "")
        + (f"; {s['set_aside']} records of other code set aside in .stale" if s["set_aside"] else "")
        + f" (executor {s['executor']}, {s['workers']} workers)"))
    return 0


def _require_existing(path: str, key: str, kind: str = "file") -> None:
    """InputError unless the input ``path`` (of option ``key``) is an existing ``kind``: "file"
    or "folder"."""
    found = Path(path)
    if not (found.is_dir() if kind == "folder" else found.is_file()):
        raise InputError(f"{kind} not found", file=path, key=key, expected=f"an existing {kind}",
                         found="missing" if not found.exists() else
                         ("a file" if kind == "folder" else "a folder"))


def cmd_records(args) -> int:
    """``records stale``: list the records a sweep set aside (other code or versions);
    ``records prune``: delete them."""
    from harness.sweep import prune_stale, stale_records

    _require_existing(args.out, "--out", "folder")
    if args.what == "prune":
        removed = prune_stale(Path(args.out))
        _emit({"removed": removed}, args.json,
              lambda d: print(f"removed {d['removed']} records set aside in {Path(args.out) / '.stale'}"))
        return 0
    found = stale_records(Path(args.out))
    _emit(found, args.json, lambda rows: print(
        "\n".join(f"{r['path']}: {r['dataset']} {r['method']}/{r['variant']} seed {r['seed']} "
                  f"({r['why']})" for r in rows)
        or f"no records set aside in {Path(args.out) / '.stale'}"))
    return 0


def cmd_search(args) -> int:
    from harness.records import require_writable_folder

    require_writable_folder(args.out)  # before Ray starts and any trial runs
    with _ray_started_early(args):
        return _search_command(args)


def _search_command(args) -> int:
    from harness.search import run_search
    from harness.settings import load_params

    params = load_params(args.params)
    _use_threads(params)
    executor, workers = _executor(args, params)
    summary = run_search(params, executor, workers or 1, Path(args.out))
    _emit(summary, args.json, lambda s: print(
        f"{s['trials']} trials on {s['dataset']} (selected on validation {s['metric']}); "
        "Pareto front: "
        + "; ".join(f"{p['method']} {p['tunable']:.0f} params -> validation "
                    f"{p['valid_' + s['metric']]:.4f} (test {_number(p.get('test_' + s['metric']))})"
                    for p in s["pareto"])))
    return 0


def _number(value) -> str:
    """``value`` to 4 decimals; a dash when there is none (a trial whose run record was pruned)."""
    return "—" if value is None else f"{value:.4f}"


def cmd_cost(args) -> int:
    import torch

    from harness.cost import cost_markdown, write_cost
    from harness.records import require_writable_file

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("no CUDA device", key="--device", expected="cpu or auto (no CUDA device "
                         "here)", found="cuda")
    for name in ("cost.json", "cost.md"):
        require_writable_file(Path(args.out) / name)
    _use_threads(None)

    report = write_cost(args.out, device=args.device, progress=True)
    _emit(report, args.json, lambda r: print(cost_markdown(r)))
    return 0


def cmd_pretrain(args) -> int:
    from harness.concurrency import stop_on_signals
    from harness.records import provenance_path
    from harness.pretrain import plan_pretrain, pretrain
    from harness.params_schema import check_train
    from harness.records import require_writable_file
    from harness.settings import load_params, parse_overrides
    from harness.train import TrainSettings

    params = load_params(args.params)
    _use_threads(params)
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    overrides, _ = parse_overrides(_parse_sets(args.set), fields, ())
    overrides = check_train(overrides, args.params, "train", command_line=tuple(overrides))
    plan = plan_pretrain(params, args.source, overrides)
    if args.seed is not None:
        plan["seed"] = args.seed
    if args.out is not None:
        plan["out_path"] = args.out
    key = "--out" if args.out is not None else f"pretrain.checkpoints.{args.source}"
    for path in (plan["out_path"], provenance_path(plan["out_path"])):
        require_writable_file(path, key)  # before training
    with stop_on_signals("no checkpoint was written; the same command starts again"):
        result = pretrain(**plan, progress=not args.json)

    def render(r):
        m, metric = r["metrics"], r["metrics"]["select_metric"]
        print(f"pretrained {r['backbone']} on {r['source']} (seed {r['seed']}, {r['parameters']} "
              f"parameters, all trained): valid {metric} {m['initial_valid'][metric]:.4f} -> "
              f"{m['valid'][metric]:.4f} (epoch {m['selected_epoch']} selected)\ncheckpoint: {r['path']}")

    _emit(result, args.json, render)
    return 0


def cmd_leaderboard(args) -> int:
    from harness.records import require_writable_file, require_writable_folder
    from harness.settings import load_params
    from harness.tables.leaderboard import write_leaderboards

    require_writable_folder(args.out)  # every output, before the first is written
    require_writable_file(args.metrics, "--metrics")
    require_writable_file(args.detail, "--detail")
    summary = write_leaderboards(args.runs, args.out, load_params(args.params),
                                 headline_path=args.metrics, detail_path=args.detail,
                                 progress=not args.json)
    _emit(summary, args.json, lambda s: print(
        "; ".join(f"{d}: {v['rows']} rows, {v['tests']} paired tests"
                  for d, v in s["leaderboards"].items()) or "no run records"))
    print(f"{len(summary['written'])} files written, {len(summary['unchanged'])} unchanged "
          f"({args.out}, {args.metrics}, {args.detail})", file=sys.stderr)
    return 0


def cmd_tables(args) -> int:
    from harness.records import require_writable_folder
    from harness.settings import load_params
    from harness.tables.render import render_all

    require_writable_folder(args.out)
    _require_existing(args.cost, "--cost")  # index.md links to it
    summary = render_all(args.runs, args.out, load_params(args.params), cost_table=args.cost,
                         progress=not args.json)
    _emit(summary, args.json, lambda s: print(
        f"{len(s['written'])} files written, {len(s['unchanged'])} unchanged in {args.out}"))
    return 0


def cmd_diff(args) -> int:
    from harness.tables.diff import diff_tables

    print(diff_tables(args.rev_a, args.rev_b))
    return 0


def cmd_extract(args) -> int:
    """The extract@<dataset> stage: cache the frozen encoders' outputs."""
    from harness.extract import extract_dataset, identity_path
    from harness.records import require_writable_file, require_writable_folder
    from harness.settings import load_params

    require_writable_folder(Path(args.out) / args.dataset)  # the cache, before extracting
    require_writable_file(identity_path(args.out, args.dataset))
    params = load_params(args.params)
    _use_threads(params)
    summary = extract_dataset(params, args.dataset, Path(args.out),
                              batch_size=args.batch_size, progress=not args.json)

    def render(s):
        if "skipped" in s:
            print(f"{s['dataset']}: not cacheable: {'; '.join(s['skipped'])}")
        else:
            states = ", ".join(f"{n} {v['status'].split(':')[0]} ({v['n']} items)"
                               for n, v in s["splits"].items())
            print(f"{s['dataset']}: {s['folder']}: {states}")

    _emit(summary, args.json, render)
    return 0


def cmd_datasets(args) -> int:
    from harness.data import describe_datasets

    rows = describe_datasets()

    def render(rows):
        width = max([len("dataset"), *(len(r["name"]) for r in rows)])
        print(f"{'dataset':<{width}} {'task':<15} {'real data':<22} {'tiny data':<14} real data path")
        for r in rows:
            state = f"present ({r['format']})" if r["present"] else "absent"
            generated = "generated" if r.get("generated_present") else "not generated"
            print(f"{r['name']:<{width}} {r['task']:<15} {state:<22} {generated:<14} {r['path']}")

    _emit(rows, args.json, render)
    return 0


def cmd_check_data(args) -> int:
    """Check the data at --path with the format and loader options its runs would use: params.yaml's
    data.<--profile>.<dataset> (a split scheme, a fold, ...) when the file and the block are there."""
    from harness.data import check_data
    from harness.params_file import read_params

    options, fmt, source = {}, args.format, "the card's defaults (no params file)"
    if Path(args.params).is_file() or args.params != "params.yaml":
        params = read_params(args.params)
        where = ("data", args.profile, args.dataset)
        block = _data_block(params, *where[1:])
        source = (f"{params['_file']} {'.'.join(where)}" if block is not None else
                  f"the card's defaults: {params['_file']} has no {'.'.join(where)}")
        if block is not None:
            fmt, options = args.format or block[0], block[1]
    report = {**check_data(args.dataset, args.path, fmt, **options),
              "loader_options": {"values": options, "from": source}}
    _emit(report, args.json, _check_summary)
    return 0


def _data_block(params: dict, profile: str, dataset: str) -> tuple[str | None, dict] | None:
    """(format, loader options) of params.yaml's data.<profile>.<dataset> (None when there is no
    such block), checked as every command checks them."""
    from harness.data import block_options, load_card
    from harness.params_schema import check_data_block

    block = ((params.get("data") or {}).get(profile) or {}).get(dataset)
    if block is None:
        return None
    if not isinstance(block, dict):
        raise InputError("expected a mapping", file=params["_file"], key=f"data.{profile}.{dataset}",
                         expected="a mapping", found=repr(block))
    options = block_options(block)
    check_data_block(load_card(dataset), block.get("format"), options, params["_file"],
                     ("data", profile, dataset))
    return block.get("format"), options


def _check_summary(r: dict) -> None:
    """check-data for a person: what was found, split sizes, labels, fixes and warnings."""
    print(f"{r.get('dataset')}: {'usable' if r.get('ok', True) else 'NOT usable'} "
          f"({r.get('format')} format at {r.get('path')})")
    options = r["loader_options"]
    print(f"  loader options: {options['values'] or 'none'} ({options['from']})")
    splits = r.get("splits") or {}
    if isinstance(splits, dict) and splits:  # items per split (videos for MSR-VTT)
        print("  splits: " + ", ".join(
            f"{name} {s.get('n', s.get('n_videos', '?')) if isinstance(s, dict) else s}"
            for name, s in splits.items()))
    modalities = r.get("modalities") or {}
    present = r.get("experts") or {}  # MSR-VTT: the experts found in the files, of the card's
    if isinstance(modalities, dict) and modalities:
        print("  modalities: " + ", ".join(
            (f"{m} (dim {v.get('dim')})" if isinstance(v, dict) and "dim" in v else str(m))
            + (f": in {present[m].get('present')} videos" if isinstance(present.get(m), dict) else "")
            for m, v in modalities.items()))
    labels = r.get("labels")
    if isinstance(labels, dict) and labels:
        print("  labels: " + ", ".join(f"{k} {v}" for k, v in labels.items()))
    fixes = {k: v for k, v in r.items() if k.endswith("_fixed") and v}
    if fixes:
        print("  fixed while loading: " + ", ".join(f"{k[:-6]} {v}" for k, v in fixes.items()))
    for warning in r.get("warnings") or []:
        print(f"  warning: {warning}")
    print(f"  checksums: {r.get('checksums')}; the full report: --json")


def cmd_data(args) -> int:
    """The data@<dataset> stage: tiny generates the dataset in a real format; paper checks the
    real files and records the check report next to where the generated data would be."""
    from harness.data import check_data, generate
    from harness.params_file import read_params, section
    from harness.records import write_json_atomic

    # only the keys this stage reads (dvc.yaml), without torch: every other key is checked by the
    # stages that read it (load_params)
    params = read_params(args.params)
    profile = params.get("profile")
    if profile not in ("tiny", "paper"):
        raise InputError("unknown profile", file=params["_file"], key="profile",
                         expected="'tiny' or 'paper'", found=repr(profile))
    target = Path("datasets/generated") / args.dataset
    if profile == "tiny":
        options = dict(section(params, "generate", args.dataset))
        try:
            report = generate(args.dataset, target, seed=params.get("data_seed", 0), **options)
        except InputError as error:
            if error.file is not None:
                raise
            # an argument of the generator: the params.yaml key it came from
            key = "data_seed" if error.key == "seed" else f"generate.{args.dataset}.{error.key}"
            raise InputError(str(error).split(" [")[0], file=params["_file"], key=key,
                             expected=error.expected, found=error.found) from None
    else:
        location = section(params, "data", profile, args.dataset)
        fmt, options = _data_block(params, profile, args.dataset)
        report = check_data(args.dataset, location["path"], fmt, **options)
        write_json_atomic(target / "check.json", report)
    _emit(report, args.json, lambda r: print(f"{args.dataset}: {profile} data ready at "
                                             f"{r.get('path', target)}"))
    return 0


def _command(sub, name: str, func, text: str, params: bool = False, json: bool = True):
    """A subcommand; ``params``: it reads params.yaml (--params), ``json``: it can print JSON."""
    p = sub.add_parser(name, help=text, description=text)
    if params:
        p.add_argument("--params", default="params.yaml")
    if json:
        p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
    return p


def _leaderboard_parser(sub) -> None:
    p = _command(sub, "leaderboard", cmd_leaderboard, "every grid row in the run records, per "
                 "dataset, ranked by the card's main metric with paired tests against Wander and "
                 "the best baseline -> results/leaderboards/, results/metrics.json (headline), "
                 "results/metrics_detail.json", params=True)
    p.add_argument("--runs", default="results/runs")
    p.add_argument("--out", default="results/leaderboards")
    p.add_argument("--metrics", default="results/metrics.json",
                   help="headline metrics: one main metric and #tunable per dataset and method")
    p.add_argument("--detail", default="results/metrics_detail.json",
                   help="every grid row's metrics (mean, std, n) and #tunable")


def _records_command(sub) -> None:
    p = _command(sub, "records", cmd_records, "run records a sweep set aside (of other code or "
                 "versions): list them (stale) or delete them (prune)")
    p.add_argument("what", choices=["stale", "prune"])
    p.add_argument("--out", default="results/runs", help="the records folder")


def _data_commands(sub) -> None:
    """datasets, check-data and data."""
    _command(sub, "datasets", cmd_datasets, "dataset cards and whether data is present")

    p = _command(sub, "check-data", cmd_check_data, "validate a real dataset; exit 2 when unusable",
                 params=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--format")
    p.add_argument("--profile", choices=["paper", "tiny"], default="paper",
                   help="whose loader options to check with: params.yaml data.<profile>.<dataset> "
                        "(default paper: the real data's)")

    p = _command(sub, "data", cmd_data, "stage data@<dataset>: generate (tiny) or check (paper)",
                 params=True)
    p.add_argument("--dataset", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpetl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _command(sub, "methods", cmd_methods, "registered methods and variants, and where each comes "
             "from (built-in, params.yaml methods, an entry point)", params=True)

    p = _command(sub, "run", cmd_run, "one fine-tuning run; writes its run record", params=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--variant", default="paper")
    p.add_argument("--seed", type=_seed_option, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a train setting or a method config field (repeatable)")
    p.add_argument("--out", default=SCRATCH_RUNS,
                   help=f"folder for the record of a run computed now (default: {SCRATCH_RUNS}, "
                        "ignored by git; `--out results/runs` adds it to the committed study). A "
                        "record of the same key in this folder or in results/runs is reused, and "
                        "the command says so")

    for name, out, func, text in (
            ("sweep", "results/runs", cmd_sweep, "run the finetune grid of params.yaml"),
            ("search", "results/search", cmd_search, "Optuna rank search (accuracy vs #tunable)")):
        p = _command(sub, name, func, text, params=True)
        p.add_argument("--executor", choices=["sequential", "process", "ray"],
                       help="default: params.yaml executor.kind")
        p.add_argument("--workers", type=_positive_option, help="default: params.yaml executor.workers")
        p.add_argument("--out", default=out)

    _records_command(sub)
    p = _command(sub, "cost", cmd_cost, "Table 6 and the Sec. 4.4 parameter counts, on this machine")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--out", default="results")

    p = _command(sub, "pretrain", cmd_pretrain, "pre-train a backbone (mosei: late fusion, "
                 "howto100m: MMT, recipes: two-tower); writes its checkpoint", params=True)
    p.add_argument("--source", required=True,
                   help="a dataset card with a regression, retrieval or classification task "
                        "(mosei, howto100m, recipes)")
    p.add_argument("--seed", type=_seed_option, default=None, help="default: pretrain.seed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a pre-training train setting (repeatable)")
    p.add_argument("--out", default=None, help="checkpoint path (default: pretrain.checkpoints.<source>)")

    _leaderboard_parser(sub)

    p = _command(sub, "tables", cmd_tables, "every table and figure of the Wander paper, regenerated",
                 params=True)
    p.add_argument("--runs", default="results/runs")
    p.add_argument("--out", default="results/tables")
    p.add_argument("--cost", default="results/cost.md", help="Table 6 (written by mmpetl cost)")

    p = _command(sub, "diff", cmd_diff, "cell-by-cell change of the results tables and "
                 "leaderboards between two revisions", json=False)
    for name, default in (("rev_a", "HEAD"), ("rev_b", "workspace")):
        p.add_argument(name, nargs="?", default=default, help="commit, branch, tag, DVC "
                       f"experiment name or workspace (the files on disk); default {default}")

    p = _command(sub, "extract", cmd_extract, "stage extract@<dataset>: cache the frozen encoders' "
                 "outputs", params=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--batch-size", type=_positive_option, default=64)
    p.add_argument("--out", default="datasets/features")

    _data_commands(sub)

    p = _command(sub, "audit", cmd_audit, "grads: gradient-health and identity-at-init checks; "
                 "params: each method's parameter counts, ours beside the released code's")
    p.add_argument("what", choices=["grads", "params"])
    p.add_argument("--method", action="append", help="restrict to this method (repeatable)")
    p.add_argument("--params", help="its `methods` (your own method modules) are audited too "
                                     "(default: params.yaml, when there is one)")
    p.add_argument("--out", help="write the rows as JSON to this file, atomically (the audit stage's "
                                  "results/audit_*.json)")
    _document(parser)
    return parser


def _dataset_help() -> str:
    from harness.data.cards import list_cards

    return ("dataset: a card's name (mmpetl datasets describes them), one of: "
            + ", ".join(list_cards()))


def _format_help() -> str:
    from harness.data.cards import list_cards, load_card

    return "; ".join(f"{name}: {', '.join(load_card(name).formats)}" for name in list_cards())


# Help for the options that have none, and the choices of those whose values argparse does not
# restrict (an unknown dataset or method exits 2 with the project's own message instead)
_OPTION_HELP = {
    "params": "the parameters file (default: params.yaml)",
    "json": "print one strict JSON document on stdout (progress and logs go to stderr)",
    "dataset": _dataset_help(),
    "method": "method (mmpetl methods lists them): wander, lora, adapter, ptuning, maple, pmf, "
              "aurora, uniadapter, full, linear",
    "variant": "paper (default) or code (the released code, where the method has it: wander, pmf, "
               "aurora, uniadapter)",
    "seed": "the run's seed (default 0)",
    "out": "output folder or file",
    "runs": "folder of run records (default: results/runs)",
    "batch_size": "items per extraction batch (default 64)",
    "path": "file or folder of the real dataset (the layouts: datasets/<name>.yaml, mmpetl datasets)",
    "format": "force a loader format instead of auto-detecting: " + _format_help(),
    "what": "what to do",
}


def _document(parser: argparse.ArgumentParser) -> None:
    from importlib import metadata

    try:
        version = metadata.version("mmpetl")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"mmpetl {version}")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for option in sub._actions:
                    if isinstance(option, argparse._HelpAction):
                        continue
                    text = option.help or _OPTION_HELP.get(option.dest, "")
                    if option.choices and "one of" not in text:
                        text = (text + "; " if text else "") + "one of: " + ", ".join(map(str, option.choices))
                    if option.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
                        text += f" (default: {option.default})"
                    option.help = text or None


# Python's garbage collector walks every live object in a full collection (generation 2), by
# default after 10 collections of generation 1. A command's imports leave 200,000-300,000 objects
# (torch, transformers, Ray): a Food-101 LoRA run made 7 full collections while importing
# (0.8-1.0 s); after 100, none. Younger generations, where a training step's garbage dies, are
# collected as before.
FULL_COLLECTION_AFTER = 100


def command() -> int:
    """The ``mmpetl`` program (its console script and ``python -m harness.cli``): ``main`` with
    fewer full collections (``FULL_COLLECTION_AFTER``; processes it forks inherit it), then every
    object it made is frozen out of the garbage collector, so the interpreter's exit does not walk
    them in its final collections (the objects of torch, Ray and pandas: 0.6 s of every
    command's exit on this machine, 1.0 s of a Ray sweep's). Objects left in a reference cycle
    are then not finalised at exit; the commands close their files and stop their processes
    themselves."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)
    try:
        return main()
    except BrokenPipeError:  # the reader went away (``mmpetl diff | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit
        return 141  # 128 + SIGPIPE, as a shell reports a program a closed pipe stopped
    finally:
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    global _json_stdout
    args = build_parser().parse_args(argv)
    _json_stdout = None
    from harness.records import lock_warning

    warning = lock_warning()  # one line on stderr when the environment is not the locked one
    if warning:
        print(warning, file=sys.stderr)
    if getattr(args, "json", False):
        _json_stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return _dispatch(args)
    return _dispatch(args)


def _dispatch(args) -> int:
    try:
        _check_methods(args)
        return args.func(args)
    except _input_errors() as error:  # anything else is a bug: its traceback, exit 1
        print(f"mmpetl: error: {error}", file=sys.stderr)
        return 2


def _load_params_methods(args) -> None:
    """Register the method modules the parameters file lists (``methods``): a user's methods are
    known to every command, not to the sweep alone. Without ``--params``: params.yaml, when here."""
    given = getattr(args, "params", None)
    if given is None and not Path("params.yaml").is_file():
        return
    from harness.params_file import read_params
    from harness.settings import load_params_methods

    load_params_methods(read_params(given or "params.yaml"))


def _check_methods(args) -> None:
    """``--method`` (and ``--variant``): registered names, else an InputError naming the option.
    A name not registered yet may be one of the parameters file's own methods: those are loaded."""
    names = getattr(args, "method", None) or []
    if not names:
        return
    from methods import get_method, method_names

    asked = [names] if isinstance(names, str) else names  # run's one method, audit's list
    if any(name not in method_names() for name in asked):
        _load_params_methods(args)
    for name in asked:
        if name not in method_names():
            raise InputError(f"unknown method {name!r}", key="--method",
                             expected=f"one of {method_names()}", found=repr(name))
    variant = getattr(args, "variant", None)  # run's: of its one method
    if variant is not None and variant not in get_method(names).variants:
        raise InputError(f"method {names!r} has no variant {variant!r}", key="--variant",
                         expected=f"one of {sorted(get_method(names).variants)}", found=repr(variant))


def _input_errors() -> tuple[type, ...]:
    """The project's input errors: ``InputError``, and ``methods.base.ConfigError`` (an invalid
    method config, an unknown method or variant) once ``methods`` is loaded (a command that never
    loaded it cannot raise it; loading it costs the torch import)."""
    base = sys.modules.get("methods.base")
    return (InputError, base.ConfigError) if base is not None else (InputError,)


if __name__ == "__main__":
    sys.exit(command())
