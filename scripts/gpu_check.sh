#!/usr/bin/env bash
# The prepared GPU check of issue 17, for a machine with a CUDA GPU and the project installed with
# the CUDA torch wheel (README "Run on a GPU", step 1). Three parts, a few minutes in all:
#
# 1. A Food-101 paper-preset step with AMP: the paper two-tower (ViT-B/16 + BERT-base sizes,
#    random weights: no download) with Wander, harness.train.fine_tune on random Food-101-shaped
#    samples on cuda with 2 loader workers and pinned memory, for amp (bf16 autocast) off and on:
#    a warm-up epoch on 64 samples, then one timed epoch on 512 (GPU_CHECK_SAMPLES); prints the
#    loss, the metrics, ms per step, the peak GPU memory and what the loader had in effect, and
#    the same step timed bare (one batch already on the device, no loader, no validation).
# 2. A 4-trial Ray sweep with fractional GPUs: 4 MOSI grid rows x 1 seed on the generated tiny
#    MOSI, device cuda, executor ray with gpus_per_trial 0.25 and runs_per_trial 1 (the four
#    trials share one GPU), then the same grid with the sequential executor; prints the summary,
#    each record's device and peak memory, and whether the metrics equal the sequential ones
#    (on a GPU they may differ in the last digits: cuBLAS picks kernels per process).
# 3. The same grid with the process executor (4 workers forked from a driver that has not
#    initialised CUDA); prints each record's device, peak memory and loader, and whether the
#    metrics equal the sequential ones. Added after the H200 run, when no GPU was lent any more:
#    not yet run on a GPU.
#
#     bash scripts/gpu_check.sh            # from the repository root; exit 1 without CUDA
#     GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # a dry run of the script itself on CPU
#
# The output of parts 1 and 2 on an H200 is quoted in docs/benchmarks.md ("GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0
export GPU_CHECK_DEVICE="${GPU_CHECK_DEVICE:-cuda}"
work="$(mktemp -d /tmp/mmpetl-gpu-check-XXXXXX)"
trap 'rm -rf "$work"' EXIT

python - <<'EOF'
import os
import sys
import torch
if os.environ["GPU_CHECK_DEVICE"] == "cpu":
    sys.exit(print("dry run on CPU"))
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}); run it on a GPU machine")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF

echo "== 1. Food-101 paper-preset step with AMP"
python - <<'EOF'
import os
import time
import torch
from harness.backbones.two_tower import TwoTowerBackbone, TwoTowerConfig
from harness.tasks.tasks import TASKS
from harness.train import TrainSettings, fine_tune, seed_everything
from methods import apply_method

mib = lambda mb: "n/a" if mb is None else f"{mb:.0f} MiB"
samples = int(os.environ.get("GPU_CHECK_SAMPLES", "512"))
synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
step_ms = {}
for amp in (False, True):
    seed_everything(0)
    backbone = TwoTowerBackbone(TwoTowerConfig.paper(num_classes=101, dropout=0.0))
    apply_method(backbone, "wander", down_dim=64)
    example = backbone.example_batch(samples, seed=1)
    items = [{**{k: v[i] for k, v in example.items()}, "label": torch.tensor(i % 101)}
             for i in range(samples)]
    settings = TrainSettings(optimizer="adamw", lr=2e-3, batch_size=32, epochs=1,
                             device=os.environ["GPU_CHECK_DEVICE"],
                             amp=amp, loader_workers=2, pin_memory=True)
    settings.validate()
    # the first epoch pays cuBLAS kernel selection and the allocator's growth: a warm-up epoch on
    # 64 samples, then one timed epoch on all of them (the same backbone, trained on)
    for train in (items[:64], items):
        started = time.perf_counter()
        result = fine_tune(backbone, TASKS["classification"],
                           {"train": train, "valid": items[:32], "test": items[:32]}, settings,
                           seed=0, progress=False)
        wall = time.perf_counter() - started
    steps = -(-samples // settings.batch_size)
    step_ms[amp] = 1000 * result["train_wall_s"] / steps
    print(f"amp {amp}: {samples} samples in {steps} steps of 32: train loss "
          f"{result['history'][0]['train_loss']:.4f}, test acc {result['test']['acc']:.4f}, "
          f"{wall:.1f} s (the epoch with its validation pass {result['train_wall_s']:.2f} s: "
          f"{step_ms[amp]:.1f} ms/step), "
          f"peak GPU memory {mib(result['peak_gpu_memory_mb'])}, loader {result['loader']}")
    # the same model and step with one batch already on the device: what a step costs without
    # the loader (collation, pinned copies) and the validation pass
    device = torch.device(settings.device)
    backbone.to(device)
    batch = {k: v[:32].to(device) for k, v in example.items()}
    labels = torch.arange(len(batch["text"]), device=device) % 101
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=2e-3)
    for step in range(3 + steps):  # 3 warm-up steps, then `steps` timed ones
        if step == 3:
            synchronize()
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(backbone(batch).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    synchronize()
    bare_ms = 1000 * (time.perf_counter() - started) / steps
    print(f"amp {amp}: the bare step (batch on the device) {bare_ms:.1f} ms; the harness's epoch "
          f"costs {step_ms[amp] / bare_ms:.2f}x that per step")
print(f"per training step, bf16 autocast vs fp32: {step_ms[False] / step_ms[True]:.2f}x faster")
EOF

echo "== 2. 4-trial Ray sweep, gpus_per_trial 0.25"
python - "$work" <<'EOF'
import os
import sys
from pathlib import Path
import yaml
from harness.data import generate

folder = Path(sys.argv[1])
params = yaml.safe_load(Path("params.yaml").read_text())
generate("mosi", folder / "mosi", seed=params["data_seed"], **params["generate"]["mosi"])
params.update(profile="tiny", datasets=["mosi"], method="all", seeds=[0], seeds_by_dataset={},
              grid={"mosi": [{"method": "wander", "down_dim": 16}, {"method": "linear"},
                             {"method": "lora", "rank": 16}, {"method": "adapter", "down_dim": 16}]})
params["data"]["tiny"]["mosi"]["path"] = str(folder / "mosi")
params["pretrain"]["use"] = {}
params["profiles"]["tiny"]["train"].update(device=os.environ["GPU_CHECK_DEVICE"], feature_cache=False,
                                          pin_memory=True)
params["executor"].update(kind="ray", workers=4, gpus_per_trial=0.25, runs_per_trial=1)
(folder / "params.yaml").write_text(yaml.safe_dump(params))
EOF
sweep() {  # the grid in $work under executor $1, records into runs-$1; prints its wall time
  local started=$SECONDS
  (cd "$work" && python -m harness.cli sweep --executor "$1" --workers 4 \
     --params params.yaml --out "runs-$1" --json > "$1.json")
  echo "$1 sweep: $((SECONDS - started)) s wall"
}
compare() {  # executor $1's summary and records, and whether its metrics equal the sequential ones
  python - "$work" "$1" <<'EOF'
import json
import sys
from pathlib import Path

folder, executor = Path(sys.argv[1]), sys.argv[2]
mib = lambda mb: "n/a" if mb is None else f"{mb:.0f} MiB"
if executor == "ray":
    print("ray summary:", json.loads((folder / "ray.json").read_text()).get("ray"))
found = {name: {path.name: json.loads(path.read_text())
                for path in sorted((folder / f"runs-{name}" / "mosi").glob("*.json"))}
         for name in (executor, "sequential")}
for name, record in found[executor].items():
    print(f"  {name}: device {record['device']}, peak GPU memory "
          f"{mib(record['peak_gpu_memory_mb'])}, loader {record['loader']}, "
          f"wall {record['wall_s']:.1f} s")
metrics = {name: {file: record["metrics"] for file, record in records.items()}
           for name, records in found.items()}
print(f"{len(found[executor])} {executor} records; metrics identical to the sequential executor's: "
      f"{metrics[executor] == metrics['sequential']}")
EOF
}
sweep ray
sweep sequential
compare ray

echo "== 3. the process executor on the same grid (added after the H200 run; not yet run on a GPU)"
sweep process
compare process
