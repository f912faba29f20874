"""Cost analysis of Wander's sequence fusion (Wander paper Sec. 4.3-4.4, Table 6).

(a) ``table6``: Table 6 regenerated on the machine it runs on. For each form of the sequence fusion
(``sf_op``: explicit outer-product form with full W_h, W_t, Eq. 10; ``sf_vf``: vector fusion per
token tuple with full W_t, Eq. 8; ``sf``: the CP-factorised sequence fusion, Eq. 13) one training
step (forward + backward, no optimiser) of the Wander module alone (Down + activation + SF +
residual) on frozen-backbone outputs of 3 MOSI-like modalities, batch 24, at reduced dimensions
that make SF-OP feasible (defaults: width D = d_h = 40, 50 tokens per modality as the released
MOSI backbone has; d = d_t = 16, R_h = R_t = 8; every value is written into the table):

- wall time: median of ``repeats`` steps after ``warmup`` steps (``torch.cuda.synchronize`` around
  each step on CUDA);
- peak memory: CUDA: ``torch.cuda.max_memory_allocated`` over one step after
  ``reset_peak_memory_stats`` (parameters, inputs, activations, gradients). CPU: tracemalloc does
  not see torch's allocator and RSS is dominated by the allocator's caching, so we report the bytes
  of the parameters and inputs plus the peak of live tensor allocations that ``torch.profiler``
  (``profile_memory=True``) records during one step (gradients are freed before the step, so they
  count as step allocations);
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode``, forward alone and the whole step. It counts
  matmul-type operations (mm / bmm / addmm / convolution / attention; einsum is lowered to bmm);
  element-wise products are not counted.

Results are given as ratios to SF next to the paper's Table 6 (GPU time, memory and FLOPs; the
paper gives neither its reduced dimensions nor the FLOP unit, so only ratios compare).

(b) ``sec44``: the Sec. 4.4 parameter counts from the paper's own complexity formulas, for three
modalities of shape (l, d_m) = (10, 768):

    SF-OP  = d_h * prod_m d_m + d_t * prod_m l_m
    SF-VF  = R_h * d_h * sum_m d_m + d_t * prod_m l_m
    Wander = R_h * d_h * sum_m d_m + R_t * d_t * sum_m l_m

with d_h = 768 (768^4 = 347.9B: the paper's "around 348B"), R_h = R_t = 8 (paper defaults) and
d_t = 10 by default (the fused sequence as long as each input; the first Wander term alone is
already 14.16M, so "around 14M" holds for any d_t up to about 2,000; see ``sec44``'s d_t sweep).
``crosscheck`` checks the same formulas (with d_m = the down dimension d and d_h = the width)
against ``count_parameters`` of ``methods.wander.Wander`` at small sizes: the module adds only its
Down projections (sum_m (D_m * d + d)).

``write_cost(out_dir)`` writes ``cost.json`` and ``cost.md`` atomically.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from harness.records import cpu_model
from methods import count_parameters
from methods.wander import Wander, WanderConfig

FORMS = ("sf_op", "sf_vf", "sf")
MODALITIES = ("text", "audio", "vision")

# Wander paper, Table 6 (CMU-MOSI, reduced dims, batch 24): GPU time (s), memory (MB), FLOPs.
TABLE6_PAPER = {
    "sf_op": {"time_s": 9.16, "memory_mb": 3300.0, "flops": 0.003},
    "sf_vf": {"time_s": 7.87, "memory_mb": 622.0, "flops": 0.002},
    "sf": {"time_s": 0.015, "memory_mb": 348.0, "flops": 0.002},
}
TABLE6_SOURCE = "Wander paper, Table 6"
# Wander paper, Sec. 4.4: three modalities of shape (10, 768).
SEC44_PAPER = {"sf_op": 348e9, "wander": 14e6}


# --- (a) Table 6 ------------------------------------------------------------------------------
@dataclass
class Table6Setting:
    batch: int = 24
    modalities: int = 3
    width: int = 40          # D = d_h: the released late-fusion width
    length: int = 50         # l_m: tokens per modality (MOSI aligned)
    down_dim: int = 16       # d (Table 5's smaller Wander)
    fused_length: int | None = None  # d_t; None = d (released code)
    rank_h: int = 8
    rank_t: int = 8
    warmup: int = 2
    repeats: int = 5
    seed: int = 0


def _device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return resolved


def make_fusion(form: str, setting: Table6Setting, device: torch.device | str = "cpu"):
    """The Wander module of ``form`` and a batch of frozen-backbone states for it."""
    names = MODALITIES if setting.modalities == 3 else tuple(f"m{i}" for i in range(setting.modalities))
    config = WanderConfig(down_dim=setting.down_dim, rank_h=setting.rank_h, rank_t=setting.rank_t,
                          fused_length=setting.fused_length, form=form)
    config.validate()
    torch.manual_seed(setting.seed)
    module = Wander({m: setting.width for m in names}, {m: setting.length for m in names},
                    setting.width, config, "relu").to(device)
    g = torch.Generator().manual_seed(setting.seed + 1)
    states = {m: torch.randn(setting.batch, setting.length, setting.width, generator=g).to(device)
              for m in names}
    return module, states


def _step(module: Wander, states: dict[str, torch.Tensor]) -> None:
    for parameter in module.parameters():
        parameter.grad = None
    out = module(states)
    loss = sum(o.float().pow(2).mean() for o in out.values())
    loss.backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(module, states, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        _step(module, states)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(module, states)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def step_flops(module, states) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of one step."""
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            module(states)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        _step(module, states)
    return forward, counter.get_total_flops()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_memory(module, states, device: torch.device) -> tuple[int, str]:
    """(peak bytes of one step, how it was measured)."""
    resident = _tensor_bytes(module.parameters()) + _tensor_bytes(states.values())
    if device.type == "cuda":
        for parameter in module.parameters():
            parameter.grad = None
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        _step(module, states)
        _sync(device)
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    for parameter in module.parameters():
        parameter.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(module, states)
    try:  # every allocation / free, in order (private but stable kineto API)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        deltas = [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())]
        how = "allocation events"
    except AttributeError:  # op granularity: each op's own allocations minus frees
        ops = sorted(prof.events(), key=lambda e: e.time_range.start)
        deltas = [e.self_cpu_memory_usage for e in ops]
        how = "per-op self memory"
    live = peak = 0
    for delta in deltas:
        live += delta
        peak = max(peak, live)
    return resident + peak, (f"parameter + input bytes + peak live allocations of the step "
                             f"(torch.profiler profile_memory, {how}); not RSS")


def table6(device: str = "cpu", progress: bool = False, **settings) -> dict:
    """Table 6 on this machine: time, peak memory and FLOPs of one training step of each form
    (``progress``: a bar on stderr, one step per form)."""
    setting = Table6Setting(**settings)
    dev = _device(device)
    rows = []
    for form in tqdm(FORMS, desc="cost: Table 6", unit="form", disable=not progress):
        module, states = make_fusion(form, setting, dev)
        times = step_time(module, states, dev, setting.warmup, setting.repeats)
        forward, total = step_flops(module, states)
        memory, how = step_memory(module, states, dev)
        rows.append({"form": form, "parameters": count_parameters(module)["method"],
                     "time_s": statistics.median(times), "times_s": times,
                     "memory_bytes": memory, "memory_mb": memory / 2 ** 20, "memory_method": how,
                     "flops_forward": forward, "flops_step": total})
        del module, states
    sf = next(r for r in rows if r["form"] == "sf")
    for r in rows:
        paper = TABLE6_PAPER[r["form"]]
        r.update({
            "ratio_time": r["time_s"] / sf["time_s"],
            "ratio_memory": r["memory_bytes"] / sf["memory_bytes"],
            "ratio_flops": r["flops_step"] / sf["flops_step"] if sf["flops_step"] else None,
            "ratio_parameters": r["parameters"] / sf["parameters"],
            "paper_time_s": paper["time_s"], "paper_memory_mb": paper["memory_mb"],
            "paper_flops": paper["flops"],
            "paper_ratio_time": paper["time_s"] / TABLE6_PAPER["sf"]["time_s"],
            "paper_ratio_memory": paper["memory_mb"] / TABLE6_PAPER["sf"]["memory_mb"],
            "paper_ratio_flops": paper["flops"] / TABLE6_PAPER["sf"]["flops"],
        })
    d_t = setting.fused_length or setting.down_dim
    return {"device": str(dev), "device_name": _device_name(dev), "threads": torch.get_num_threads(),
            "setting": asdict(setting), "fused_length_effective": d_t,
            "dimensions": (f"batch {setting.batch}, {setting.modalities} modalities x "
                           f"({setting.length} tokens, width {setting.width}), d = {setting.down_dim}, "
                           f"d_t = {d_t}, d_h = {setting.width}, R_h = {setting.rank_h}, "
                           f"R_t = {setting.rank_t}"),
            "measures": {"time": f"median of {setting.repeats} steps (forward + backward) after "
                                 f"{setting.warmup} warm-up steps",
                         "memory": rows[0]["memory_method"],
                         "flops": "FlopCounterMode (matmul-type ops only), forward + backward"},
            "paper_source": TABLE6_SOURCE, "rows": rows}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}"


# --- (b) Sec. 4.4 ----------------------------------------------------------------------------
def fusion_parameters(form: str, dims: list[int], lengths: list[int], d_h: int, d_t: int,
                      rank_h: int, rank_t: int) -> int:
    """The paper's parameter formulas of the sequence fusion (Sec. 4.4), Down projections excluded."""
    if form == "sf_op":
        return d_h * math.prod(dims) + d_t * math.prod(lengths)
    if form == "sf_vf":
        return rank_h * d_h * sum(dims) + d_t * math.prod(lengths)
    if form == "sf":
        return rank_h * d_h * sum(dims) + rank_t * d_t * sum(lengths)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def sec44(length: int = 10, dim: int = 768, modalities: int = 3, d_h: int = 768, d_t: int = 10,
          rank_h: int = 8, rank_t: int = 8, sweep=(1, 10, 30, 64, 768)) -> dict:
    """The Sec. 4.4 example from the formulas, the arithmetic written out, and a d_t sweep."""
    dims, lengths = [dim] * modalities, [length] * modalities
    counts = {f: fusion_parameters(f, dims, lengths, d_h, d_t, rank_h, rank_t) for f in FORMS}
    M = modalities
    arithmetic = {
        "sf_op": f"{d_h} x {dim}^{M} + {d_t} x {length}^{M} = {d_h * dim ** M:,} + "
                 f"{d_t * length ** M:,} = {counts['sf_op']:,}",
        "sf_vf": f"{rank_h} x {d_h} x ({M} x {dim}) + {d_t} x {length}^{M} = "
                 f"{rank_h * d_h * M * dim:,} + {d_t * length ** M:,} = {counts['sf_vf']:,}",
        "sf": f"{rank_h} x {d_h} x ({M} x {dim}) + {rank_t} x {d_t} x ({M} x {length}) = "
              f"{rank_h * d_h * M * dim:,} + {rank_t * d_t * M * length:,} = {counts['sf']:,}",
    }
    fixed = rank_h * d_h * M * dim          # the d_t-free part of Wander's count
    per_dt = rank_t * M * length            # what each unit of d_t adds
    target = SEC44_PAPER["wander"]
    return {
        "setting": {"modalities": M, "length": length, "dim": dim, "d_h": d_h, "d_t": d_t,
                    "rank_h": rank_h, "rank_t": rank_t},
        "counts": counts, "arithmetic": arithmetic, "paper": dict(SEC44_PAPER),
        "relative_error": {"sf_op": counts["sf_op"] / SEC44_PAPER["sf_op"] - 1,
                           "sf": counts["sf"] / target - 1},
        "d_h_for_348B": SEC44_PAPER["sf_op"] / dim ** M,
        "wander_fixed_part": fixed, "wander_per_d_t": per_dt,
        "d_t_sweep": [{"d_t": v, "wander": fixed + per_dt * v,
                       "relative_error": (fixed + per_dt * v) / target - 1} for v in sweep],
        "d_t_max_within": {str(tol): max(0, math.floor((target * (1 + tol) - fixed) / per_dt))
                           for tol in (0.02, 0.05)},
    }


def crosscheck(sizes: tuple[dict, ...] = (
        dict(dims=(7, 9, 11), lengths=(3, 4, 6), width=12, down_dim=5, fused_length=4,
             rank_h=3, rank_t=2),
        dict(dims=(6, 6), lengths=(5, 2), width=8, down_dim=3, fused_length=2, rank_h=2,
             rank_t=4))) -> list[dict]:
    """``count_parameters`` of ``methods.wander.Wander`` against the Sec. 4.4 formulas (d_m = d,
    d_h = width) plus the Down projections, for every form, at small sizes."""
    rows = []
    for size in sizes:
        names = tuple(f"m{i}" for i in range(len(size["dims"])))
        for form in FORMS:
            config = WanderConfig(down_dim=size["down_dim"], rank_h=size["rank_h"],
                                  rank_t=size["rank_t"], fused_length=size["fused_length"],
                                  form=form)
            config.validate()
            module = Wander(dict(zip(names, size["dims"])), dict(zip(names, size["lengths"])),
                            size["width"], config, "relu")
            counted = count_parameters(module)["method"]
            down = sum(D * size["down_dim"] + size["down_dim"] for D in size["dims"])
            formula = fusion_parameters(form, [size["down_dim"]] * len(names), list(size["lengths"]),
                                        size["width"], size["fused_length"], size["rank_h"],
                                        size["rank_t"])
            rows.append({"form": form, "size": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in size.items()},
                         "count_parameters": counted, "down": down, "formula": formula,
                         "equal": counted == down + formula})
    return rows


# --- document, Markdown, files -----------------------------------------------------------------
def cost_report(device: str = "cpu", progress: bool = False, **table6_settings) -> dict:
    return {"table6": table6(device, progress, **table6_settings), "sec44": sec44(),
            "crosscheck": crosscheck(), "torch": torch.__version__}


def _contraction_order() -> str:
    if torch.backends.opt_einsum.is_available() and torch.backends.opt_einsum.enabled:
        return (f"torch.einsum picks the pairwise contraction order with opt_einsum "
                f"(strategy '{torch.backends.opt_einsum.strategy}').")
    return "opt_einsum is not installed, so torch.einsum contracts operands left to right."


def _g(x: float) -> str:
    return f"{x:.3g}"


def cost_markdown(report: dict) -> str:
    t6, s44 = report["table6"], report["sec44"]
    lines = ["# Cost analysis of the sequence fusion (Wander Sec. 4.3-4.4, Table 6)", "",
             f"## Table 6 on this machine ({t6['device']}: {t6['device_name']}, "
             f"{t6['threads']} threads)", "",
             f"One training step (forward + backward, no optimiser) of the Wander module alone "
             f"(Down + ReLU + fusion + residual) on random frozen-backbone states. Dimensions: "
             f"{t6['dimensions']}.", "",
             f"- time: {t6['measures']['time']}",
             f"- memory: {t6['measures']['memory']}",
             f"- FLOPs: {t6['measures']['flops']}", "",
             "| Form | Params | Time (s) | Memory (MB) | GFLOPs fwd | GFLOPs step | Time / SF | "
             "Memory / SF | FLOPs / SF |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in t6["rows"]:
        flops_ratio = "-" if r["ratio_flops"] is None else _g(r["ratio_flops"])
        lines.append(
            f"| {r['form']} | {r['parameters']:,} | {r['time_s']:.4g} | {r['memory_mb']:.1f} | "
            f"{r['flops_forward'] / 1e9:.4g} | {r['flops_step'] / 1e9:.4g} | {_g(r['ratio_time'])} | "
            f"{_g(r['ratio_memory'])} | {flops_ratio} |")
    lines += ["", f"{t6['paper_source']}, beside it:", "",
              "| Form | Time (s) | Memory (MB) | FLOPs | Time / SF | Memory / SF | FLOPs / SF |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in t6["rows"]:
        lines.append(f"| {r['form']} | {r['paper_time_s']} | {r['paper_memory_mb']:g} | "
                     f"{r['paper_flops']} | {_g(r['paper_ratio_time'])} | "
                     f"{_g(r['paper_ratio_memory'])} | {_g(r['paper_ratio_flops'])} |")
    lines += ["", f"Paper values typed from {t6['paper_source']} (GPU; reduced dims not given; "
                  f"FLOP unit not given). Our SF-OP contracts Eq. 10 with one torch.einsum without "
                  f"materialising the outer product, and SF-VF contracts Eq. 8 the same way; "
                  f"{_contraction_order()} The contraction order sets the relative cost of SF-OP "
                  f"and SF-VF.", "",
              "## Sec. 4.4 parameter counts from the paper's formulas", ""]
    st = s44["setting"]
    lines += [f"Setting: {st['modalities']} modalities of shape ({st['length']}, {st['dim']}), "
              f"d_h = {st['d_h']}, d_t = {st['d_t']}, R_h = {st['rank_h']}, R_t = {st['rank_t']}.",
              ""]
    for form, label in (("sf_op", "SF-OP"), ("sf_vf", "SF-VF"), ("sf", "Wander (SF)")):
        lines.append(f"- {label}: {s44['arithmetic'][form]}")
    lines += ["",
              f"- paper: SF-OP around 348B (ours {s44['counts']['sf_op'] / 1e9:.2f}B, "
              f"{s44['relative_error']['sf_op']:+.2%}); d_h = 348e9 / 768^3 = "
              f"{s44['d_h_for_348B']:.2f}, i.e. d_h = 768.",
              f"- paper: Wander around 14M (ours {s44['counts']['sf'] / 1e6:.3f}M, "
              f"{s44['relative_error']['sf']:+.2%}). The d_t-free part R_h d_h sum d_m = "
              f"{s44['wander_fixed_part']:,} is already 14.16M; each unit of d_t adds R_t sum l_m = "
              f"{s44['wander_per_d_t']}, so d_t cannot be pinned down: any d_t <= "
              f"{s44['d_t_max_within']['0.02']:,} stays within 2% of 14M, <= "
              f"{s44['d_t_max_within']['0.05']:,} within 5%.", "",
              "| d_t | Wander parameters | vs 14M |", "|---:|---:|---:|"]
    for r in s44["d_t_sweep"]:
        lines.append(f"| {r['d_t']} | {r['wander']:,} | {r['relative_error']:+.2%} |")
    lines += ["", "## Cross-check: formulas vs count_parameters(methods.wander.Wander)", "",
              "| Form | Size | count_parameters | Down | Formula | Equal |",
              "|---|---|---:|---:|---:|---|"]
    for r in report["crosscheck"]:
        s = r["size"]
        size = (f"dims {s['dims']}, l {s['lengths']}, D {s['width']}, d {s['down_dim']}, "
                f"d_t {s['fused_length']}, R_h {s['rank_h']}, R_t {s['rank_t']}")
        lines.append(f"| {r['form']} | {size} | {r['count_parameters']:,} | {r['down']:,} | "
                     f"{r['formula']:,} | {r['equal']} |")
    return "\n".join(lines) + "\n"


def write_cost(out_dir: str | Path = "results", device: str = "cpu", progress: bool = False,
               **table6_settings) -> dict:
    """Compute the report and write ``out_dir/cost.json`` and ``out_dir/cost.md`` atomically."""
    from harness.records import versions, write_json_atomic, write_text_atomic

    report = cost_report(device, progress, **table6_settings)
    report["versions"] = versions()
    out = Path(out_dir)
    write_json_atomic(out / "cost.json", report)
    write_text_atomic(out / "cost.md", cost_markdown(report))
    return report


__all__ = ["TABLE6_PAPER", "SEC44_PAPER", "Table6Setting", "table6", "sec44", "crosscheck",
           "fusion_parameters", "cost_report", "cost_markdown", "write_cost", "make_fusion"]
