#!/usr/bin/env bash
# The one prepared run for a session that is lent a GPU machine (issue: performance). On that
# machine, from the repository root, with the CIFAR-10 JPEG archive carried in .data/:
#
#   here:    mkdir -p .data && cp ../shared/data/cifar10_jpg/cifar10_jpg.tgz .data/
#   device:  run(command="bash benchmarks/gpu_session.sh", carry=[".data"], timeout_s=590)
#
# It needs only the machine's own torch, torchvision, numpy, pyyaml and tqdm (imgclf runs from
# src/; snakemake and submitit are never imported). What it writes to $OUT comes back:
#   data.log, train.log     preparing CIFAR-10, then the reference README's ResNet-PreAct-20 row
#                           (label_smoothing_mixup_ricap.yaml rp20_200ep: cosine, lr 0.2, batch 128,
#                           200 epochs; its 7.60 % took 24 min on a GTX 1080 Ti) with AMP
#   result.json, train_log.csv, env.json   that run's outcome
#   RESULTS.md              `python -m benchmarks.run --device cuda` (the GPU section to paste into
#                           benchmarks/RESULTS.md; planning is left to the CPU section)
#
# The training should take ~4 minutes at the 45k img/s target and the benchmark (at most ~5 s per
# measurement) a few more. EPOCHS, DEVICE, TRAIN_EXTRA (more KEY VALUE overrides) and BENCH_ARGS
# adjust it; on a CPU,
#   OUT=/tmp/o DEVICE=cpu EPOCHS=1 TRAIN_EXTRA="model.resnet_preact.depth 8" BENCH_ARGS=--smoke \
#     bash benchmarks/gpu_session.sh
# checks the script itself in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
EPOCHS=${EPOCHS:-200}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-$([ "$DEVICE" = cpu ] && echo fp32 || echo amp)}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export IMGCLF_DATA_ROOT=${IMGCLF_DATA_ROOT:-/tmp/imgclf-data} IMGCLF_CACHE_DIR=${IMGCLF_CACHE_DIR:-/tmp/imgclf-cache}
py=$(command -v python3 || command -v python)
mkdir -p "$OUT"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  time "$py" -m imgclf data cifar10 --from .data/cifar10_jpg.tgz; } 2>&1 | tee "$OUT/data.log"

run=/tmp/imgclf-run/rp20_200ep
rm -rf "$run"
{ time "$py" -m imgclf train --config config/recipes/cifar/resnet_preact.yaml --output-dir "$run" --quiet \
    device "$DEVICE" model.resnet_preact.depth 20 train.batch_size 128 train.base_lr 0.2 \
    scheduler.type cosine scheduler.epochs "$EPOCHS" train.precision "$PRECISION" ${TRAIN_EXTRA:-}; } \
  2>&1 | tee "$OUT/train.log"
cp "$run"/result.json "$run"/train_log.csv "$run"/env.json "$OUT/"

# shellcheck disable=SC2086
"$py" -m benchmarks.run --device "$DEVICE" --no-snakemake --out "$OUT/RESULTS.md" ${BENCH_ARGS:---max-seconds 5} 2>&1 \
  | tee "$OUT/bench.log" | tail -n 200
