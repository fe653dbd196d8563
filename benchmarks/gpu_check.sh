#!/usr/bin/env bash
# The prepared device check, for a machine with a CUDA GPU and seeclip installed
# (`pip install -e ".[dev]"` with a CUDA torch). Under 5 minutes; prints the figures to record in
# docs/performance.md:
#   1. the test suite's GPU-marked tests (a GPU run against the CPU run; with two GPUs, torchrun
#      on NCCL against one GPU);
#   2. SeeCLIP's step with ViT-B-16 shapes on the GPU: 7 / 65 / 345 classes at batch 16, fp32
#      against bf16 autocast of the text tower (speed and error side by side), and a profile;
#   3. a short 2-process torchrun run on the embedded digits world (DistributedDataParallel:
#      NCCL with one GPU per process where the machine has two, else gloo on the CPU), and its
#      record's device;
#   4. the dress rehearsal on CUDA: a PACS-shaped tree, random ViT-B-16 weights from a file, a
#      random SD-1.5-shaped diffusers folder, prepare -> sweep (seeclip with the online
#      generator at SD's own 512 px and 20 steps, bf16 text tower) -> report -> predict, with
#      wall time and peak memory per stage;
#   5. the online generator's cost per image on the GPU (SD-1.5 shape, 512 px, 20 steps).
#
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
export SEECLIP_HOME="${SEECLIP_HOME:-$(mktemp -d)}"
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
PY
echo "== 1. GPU-marked tests"
timeout 120 python -m pytest -q -m gpu -p no:cacheprovider tests || echo "GPU TESTS FAILED"
echo "== 2. SeeCLIP step, ViT-B-16 shapes, on the GPU"
timeout 120 python benchmarks/seeclip_scaling.py --device cuda --classes 7 65 345 --batch 16 \
    --batches 32 --profile-classes 65 || echo "BENCHMARK FAILED"
echo "== 3. torchrun, 2 processes, digits (2 epochs)"
timeout 90 seeclip prepare digits --n-per-class 20 --no-progress > /dev/null
timeout 90 torchrun --nproc_per_node=2 -m seeclip eval --benchmark digits --method seeclip \
    --target printed --no-progress --runs-dir "$SEECLIP_HOME/runs" train.epochs=2 \
    || echo "TORCHRUN FAILED"
python - "$SEECLIP_HOME/runs" <<'PY'
import json, pathlib, sys
for done in pathlib.Path(sys.argv[1]).glob("*/*/done"):
    r = json.loads((done.parent / "results.jsonl").read_text().splitlines()[-1])
    print(done.parent.name, "device", r.get("device"), "processes", r.get("processes"),
          "H", r.get("h_score"), "fit_seconds", r.get("fit_seconds"))
PY
echo "== 4. dress rehearsal on CUDA (PACS tree, ViT-B-16, SD-1.5 shape at 512 px, 20 steps)"
timeout 300 python scripts/rehearsal.py --out "$SEECLIP_HOME/rehearsal" --trees pacs \
    --targets first --device cuda --dtype bf16 --sd-image-size 512 --sample-steps 20 \
    || echo "REHEARSAL FAILED"
echo "== 5. online generator, seconds per image on the GPU"
timeout 120 python benchmarks/online_generator.py --device cuda --sizes 512 \
    --sd15 "$(ls -d "$SEECLIP_HOME"/rehearsal/cache/sd-sd15-* | head -1)" \
    || echo "GENERATOR BENCHMARK FAILED"
