#!/usr/bin/env bash
# The one prepared run for a session that is lent a GPU machine (about 15 min per loan, start-up
# included; at most 10 min per command). From the repository root, with the CIFAR-10 JPEG archive
# carried in .data/:
#
#   here:    mkdir -p .data && cp ../shared/data/cifar10_jpg/cifar10_jpg.tgz .data/
#   device:  run(command="bash benchmarks/gpu_session.sh", carry=[".data"], timeout_s=540)
#
# It needs only the machine's own torch, torchvision, numpy, pyyaml and tqdm (imgclf runs from
# src/; snakemake and submitit are never imported). The whole command stays under BUDGET_S
# (default 470 s, under 8 min). Parts, each under its own `timeout` (at most what is left of the
# budget), in this order; a part that fails or times out is recorded in $OUT/parts.log and the
# next one runs. Every measurement is taken after untimed warm-up steps, whose time (and the
# compile's) is recorded on its own.
#   1. env.log        GPU, driver, torch/torchvision/CUDA/Triton versions, and what Triton needs to
#                     build its kernels: gcc and the Python headers (torch.compile on CUDA fails
#                     without them, and train.compile then falls back to eager)
#   2. data.log       CIFAR-10 from .data/cifar10_jpg.tgz
#   3. steps.jsonl/md the trainer's own step (imgclf's Trainer, benchmarks/gpu_steps.py) for
#                     ResNet-PreAct-20 and WRN-28-10, batch 128: fp32 (IEEE), tf32, amp, bf16,
#                     amp with train.epoch_augmentation (per-step and batched draws); eager
#   4. ddp_nccl/      2 ranks on the one GPU (torchrun + imgclf train, train.dist.backend nccl,
#                     SyncBatchNorm on): 1 epoch of ResNet-PreAct-20, every collective the trainer
#                     uses (DDP's broadcast and all-reduce, SyncBN's all-gather, the stop check, the
#                     epoch's sums, the evaluation); ddp.log says whether it worked and its img/s.
#                     If nccl fails, ddp_gloo/ tries the same on gloo (no SyncBN) for comparison
#   5. calibration.json/jsonl/md  `imgclf calibrate`: aggregate img/s of k = 1, 2, 4 concurrent
#                     training processes on the GPU, ResNet-PreAct-20 and -56, fp32 and amp, batch
#                     128, after untimed warm-up steps run together; calibration.json is the file
#                     the plan's GPU-hours read (copy it to config/calibration.json)
#   6. steps.jsonl/md (appended) the same models with train.compile (amp; then with the batched
#                     epoch buffer too): compile_s is the trainer's compile probe
#   7. rp20_200ep/    the reference README's ResNet-PreAct-20 row (rp20_200ep: cosine, lr 0.2,
#                     batch 128, 200 epochs) in AMP with the rest of the budget (train_log.csv is
#                     rewritten every epoch); skipped when under 30 s are left
# Everything is written into $OUT as it is produced, so a command cut short keeps what it had.
# PARTS="steps ddp ..." runs only those parts (env always runs).
#
# SMOKE=1 checks the script itself on a CPU (CI runs it): tiny models on the digits, 2 gloo
# ranks on the CPU, k = 1 and 2, no compile, 1 epoch of the training row.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
SMOKE=${SMOKE:-0}
BUDGET_S=${BUDGET_S:-470}
PARTS=${PARTS:-data steps ddp calibrate compiled train}
DEVICE=${DEVICE:-$([ "$SMOKE" = 1 ] && echo cpu || echo cuda)}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export IMGCLF_DATA_ROOT=${IMGCLF_DATA_ROOT:-/tmp/imgclf-data} IMGCLF_CACHE_DIR=${IMGCLF_CACHE_DIR:-/tmp/imgclf-cache}
py=$(command -v python3 || command -v python)
mkdir -p "$OUT"
start=$(date +%s)

left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
wanted() { [[ " $PARTS " == *" $1 "* ]]; }
# part NAME SECONDS CMD...: run CMD under `timeout` (at most what is left of the budget), say how it ended
part() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  (( limit > rest )) && limit=$rest
  if (( limit < 5 )); then echo "$name: skipped, budget spent" >> "$OUT/parts.log"; return 1; fi
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local how=ok; (( rc == 124 || rc == 137 )) && how="timed out after ${limit} s"; (( rc && rc != 124 && rc != 137 )) && how="failed (rc $rc)"
  echo "$name: $how, $(( $(date +%s) - t0 )) s" >> "$OUT/parts.log"
  return $rc
}

envinfo() {
  date -u +"%F %T UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$py" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
  if command -v gcc >/dev/null; then echo "gcc: $(gcc --version | head -1)"; else
    echo "gcc: MISSING (Triton cannot build its kernels' launcher: torch.compile on CUDA fails)"; fi
  "$py" -c "import os, sysconfig; inc = sysconfig.get_paths()['include']; ok = os.path.isfile(os.path.join(inc, 'Python.h'))
print('python headers:', inc, 'ok' if ok else 'MISSING Python.h (Triton cannot build its launcher: torch.compile on CUDA fails)')"
  echo "cpus: $(nproc)"
}
part env 30 bash -c "$(declare -f envinfo); py=$py; envinfo" > "$OUT/env.log" 2>&1

if [ "$SMOKE" = 1 ]; then
  steps_args=(--smoke --models resnet_preact20 --max-seconds 1)
  eager_configs=(fp32 tf32)
  compiled_configs=()
  calib_args=(--recipes config/recipes/digits --models resnet_preact-8,initial_channels=8@16 --precisions fp32
              --k 1 2 --steps 5 --warmup 2 --k-timeout 120)
  ddp_args=(--config config/recipes/digits/resnet_preact.yaml model.resnet_preact.depth 8
            model.resnet_preact.initial_channels 8 scheduler.epochs 1 train.batch_size 64)
  ddp_backends=(gloo)
  train_args=(--config config/recipes/digits/resnet_preact.yaml model.resnet_preact.depth 8
              model.resnet_preact.initial_channels 8 scheduler.epochs 1)
else
  steps_args=(--max-seconds 3)
  eager_configs=(fp32 tf32 amp bf16 amp+epoch_augmentation amp+epoch_augmentation_batched)
  compiled_configs=(amp+compile amp+compile+epoch_augmentation_batched)
  # 4 measurements per k, each at most 4 timed seconds after its warm-up: about 40 s per k
  calib_args=(--models resnet_preact-20 resnet_preact-56 --precisions fp32 amp --k 1 2 4 --steps 300
              --warmup 20 --max-seconds 4 --k-timeout 60)
  ddp_args=(--config config/recipes/cifar/resnet_preact.yaml model.resnet_preact.depth 20 train.batch_size 256
            scheduler.epochs 1 train.precision amp)
  ddp_backends=(nccl gloo)
  train_args=(--config config/recipes/cifar/resnet_preact.yaml model.resnet_preact.depth 20
              train.batch_size 128 train.base_lr 0.2 scheduler.type cosine scheduler.epochs "${EPOCHS:-200}"
              train.precision amp)
  wanted data && part data 90 "$py" -m imgclf data cifar10 --from .data/cifar10_jpg.tgz > "$OUT/data.log" 2>&1
fi

# shellcheck disable=SC2086
wanted steps && part steps 100 "$py" -m benchmarks.gpu_steps --device "$DEVICE" --jsonl "$OUT/steps.jsonl" \
  --out "$OUT/steps.md" --configs "${eager_configs[@]}" "${steps_args[@]}" ${STEPS_EXTRA:-} > "$OUT/steps.log" 2>&1

# 2 ranks on this one device through the project's own entry points (torchrun + imgclf train)
ddp_cmd() {  # BACKEND: the command, into the array `cmd`
  local sync_bn=False
  [ "$1" = nccl ] && sync_bn=True
  cmd=("$py" -m torch.distributed.run --standalone --nproc_per_node 2 -m imgclf train --output-dir "$OUT/ddp_$1"
       --quiet "${ddp_args[@]}" train.dist.backend "$1" train.dist.world_size 2 train.dist.use_sync_bn "$sync_bn"
       train.distributed True device "$DEVICE")
}
ddp_report() {  # BACKEND RC: one line per attempt into ddp.log
  local dir=$OUT/ddp_$1
  "$py" - "$1" "$2" "$dir" >> "$OUT/ddp.log" 2>&1 <<'EOF'
import csv, json, sys
from pathlib import Path
backend, rc, run = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
rows = list(csv.DictReader(open(run / "train_log.csv"))) if (run / "train_log.csv").is_file() else []
line = {"backend": backend, "world_size": 2, "works": rc == 0 and (run / "result.json").is_file(), "rc": rc,
        "images_per_second": float(rows[-1]["images_per_second"]) if rows else None,
        "epoch_seconds": float(rows[-1]["epoch_seconds"]) if rows else None}
print(json.dumps(line))
EOF
  rm -f "$dir"/checkpoint*.pt "$dir"/model.pt
}
if wanted ddp; then
  for backend in "${ddp_backends[@]}"; do
    ddp_cmd "$backend"
    part "ddp_$backend" 50 "${cmd[@]}" > "$OUT/ddp_$backend.log" 2>&1
    rc=$?
    ddp_report "$backend" "$rc"
    (( rc == 0 )) && break  # gloo only where nccl failed
  done
fi

# shellcheck disable=SC2086
wanted calibrate && part calibrate 150 "$py" -m imgclf calibrate --device "$DEVICE" \
  --output "$OUT/calibration.json" --jsonl "$OUT/calibration.jsonl" --markdown "$OUT/calibration.md" \
  "${calib_args[@]}" ${CALIB_EXTRA:-} > "$OUT/calibration.log" 2>&1

if wanted compiled && (( ${#compiled_configs[@]} )); then
  # The rows go after the eager ones, in a table of their own (steps.md holds the eager table).
  part compiled 170 "$py" -m benchmarks.gpu_steps --device "$DEVICE" --jsonl "$OUT/steps.jsonl" \
    --out "$OUT/steps_compiled.md" --configs "${compiled_configs[@]}" "${steps_args[@]}" \
    > "$OUT/steps_compiled.log" 2>&1
fi

run=$OUT/rp20_200ep
if wanted train; then
  if (( $(left) - 10 < 30 )); then echo "train: skipped, under 30 s left" >> "$OUT/parts.log"; else
    # shellcheck disable=SC2086
    part train "$(( $(left) - 10 ))" "$py" -m imgclf train --output-dir "$run" --quiet "${train_args[@]}" \
      device "$DEVICE" ${TRAIN_EXTRA:-} > "$OUT/train.log" 2>&1
    rm -rf "$run"/checkpoint*.pt "$run"/compile_cache  # not worth the transfer; log, env and result are
  fi
fi
echo "total: $(( $(date +%s) - start )) s of $BUDGET_S" >> "$OUT/parts.log"
cat "$OUT/parts.log"
