#!/usr/bin/env bash
# The prepared GPU check of issue 17, for a machine with a CUDA GPU and the project installed with
# the CUDA torch wheel (README "Run on a GPU", step 1). Two parts, a few minutes in all:
#
# 1. A Food-101 paper-preset step with AMP: the paper two-tower (ViT-B/16 + BERT-base sizes,
#    random weights: no download) with Wander, one epoch of harness.train.fine_tune on 64 random
#    Food-101-shaped samples on cuda, with amp (bf16 autocast), 2 loader workers and pinned
#    memory; prints the loss, the metrics, the wall time, the peak GPU memory and what the loader
#    had in effect, for amp off and on.
# 2. A 4-trial Ray sweep with fractional GPUs: 4 MOSI grid rows x 1 seed on the generated tiny
#    MOSI, device cuda, executor ray with gpus_per_trial 0.25 and runs_per_trial 1 (the four
#    trials share one GPU), then the same grid with the sequential executor; prints the summary,
#    each record's device and peak memory, and whether the metrics equal the sequential ones
#    (on a GPU they may differ in the last digits: cuBLAS picks kernels per process).
#
#     bash scripts/gpu_check.sh            # from the repository root; exit 1 without CUDA
#     GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # a dry run of the script itself on CPU
#
# Not run on a GPU yet (no GPU machine was lent when it was written).
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

for amp in (False, True):
    seed_everything(0)
    backbone = TwoTowerBackbone(TwoTowerConfig.paper(num_classes=101, dropout=0.0))
    apply_method(backbone, "wander", down_dim=64)
    example = backbone.example_batch(64, seed=1)
    items = [{**{k: v[i] for k, v in example.items()}, "label": torch.tensor(i % 101)}
             for i in range(64)]
    settings = TrainSettings(optimizer="adamw", lr=2e-3, batch_size=16, epochs=1,
                             device=os.environ["GPU_CHECK_DEVICE"],
                             amp=amp, loader_workers=2, pin_memory=True)
    settings.validate()
    started = time.perf_counter()
    result = fine_tune(backbone, TASKS["classification"],
                       {"train": items, "valid": items[:16], "test": items[:16]}, settings, seed=0,
                       progress=False)
    print(f"amp {amp}: train loss {result['history'][0]['train_loss']:.4f}, test acc "
          f"{result['test']['acc']:.4f}, {time.perf_counter() - started:.1f} s (train "
          f"{result['train_wall_s']:.1f} s), peak GPU memory {result['peak_gpu_memory_mb']} MiB, "
          f"loader {result['loader']}")
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
for executor in ray sequential; do
  started=$SECONDS
  (cd "$work" && python -m harness.cli sweep --executor "$executor" --workers 4 \
     --params params.yaml --out "runs-$executor" --json > "$executor.json")
  echo "$executor sweep: $((SECONDS - started)) s wall"
done
python - "$work" <<'EOF'
import json
import sys
from pathlib import Path

folder = Path(sys.argv[1])
print("ray summary:", json.loads((folder / "ray.json").read_text()).get("ray"))
found = {}
for executor in ("ray", "sequential"):
    for path in sorted((folder / f"runs-{executor}" / "mosi").glob("*.json")):
        record = json.loads(path.read_text())
        found.setdefault(executor, {})[path.name] = record["metrics"]
        if executor == "ray":
            print(f"  {path.name}: device {record['device']}, peak GPU memory "
                  f"{record['peak_gpu_memory_mb']} MiB, loader {record['loader']}, "
                  f"wall {record['wall_s']:.1f} s")
print(f"{len(found.get('ray', {}))} ray records; metrics identical to the sequential executor's: "
      f"{found.get('ray') == found.get('sequential')}")
EOF
