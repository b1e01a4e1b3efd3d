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
# (default 450 s = 7.5 min). Parts, each under its own `timeout`, in this order; a part that fails
# or times out is recorded in $OUT/parts.log and the next one runs:
#   1. env.log      GPU, driver, torch/torchvision/CUDA versions
#   2. steps.jsonl, steps.md   ResNet-PreAct-20 and WRN-28-10 step throughput (batch 128) in
#                   fp32 (IEEE) / tf32 / AMP fp16 / bf16, eager first, then with the speed path
#                   (torch.compile); one line per measurement as it is measured (STEPS_S, 200 s)
#   3. data.log     CIFAR-10 from .data/cifar10_jpg.tgz
#   4. rp20_200ep/  the reference README's ResNet-PreAct-20 row (label_smoothing_mixup_ricap.yaml
#                   rp20_200ep: plain, cosine, lr 0.2, batch 128, 200 epochs; its 7.60 % took 24 min on a
#                   GTX 1080 Ti) in AMP, trained in $OUT itself (train_log.csv rewritten every
#                   epoch, env.json, result.json at the end), capped by the budget that is left;
#                   train.log is its console.
# Everything is written into $OUT as it is produced, so a command cut short keeps what it had.
#
# SMOKE=1 checks the script itself on a CPU in seconds (CI runs it): a tiny model, fp32 and tf32,
# eager only, and 1 epoch of a tiny model on the digits instead of CIFAR-10.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
SMOKE=${SMOKE:-0}
BUDGET_S=${BUDGET_S:-450}
STEPS_S=${STEPS_S:-200}
DATA_S=${DATA_S:-60}
DEVICE=${DEVICE:-$([ "$SMOKE" = 1 ] && echo cpu || echo cuda)}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export IMGCLF_DATA_ROOT=${IMGCLF_DATA_ROOT:-/tmp/imgclf-data} IMGCLF_CACHE_DIR=${IMGCLF_CACHE_DIR:-/tmp/imgclf-cache}
py=$(command -v python3 || command -v python)
mkdir -p "$OUT"
start=$(date +%s)

left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
# part NAME SECONDS CMD...: run CMD under `timeout` (at most what is left of the budget), say how it ended
part() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  (( limit > rest )) && limit=$rest
  if (( limit < 5 )); then echo "$name: skipped, budget spent" >> "$OUT/parts.log"; return; fi
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local how=ok; (( rc == 124 || rc == 137 )) && how="timed out after ${limit} s"; (( rc && rc != 124 && rc != 137 )) && how="failed (rc $rc)"
  echo "$name: $how, $(( $(date +%s) - t0 )) s" >> "$OUT/parts.log"
}

envinfo() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
}
part env 30 bash -c "$(declare -f envinfo); py=$py; envinfo" > "$OUT/env.log" 2>&1

if [ "$SMOKE" = 1 ]; then
  steps_args=(--smoke --models resnet_preact20 --precisions fp32 tf32 --speed off)
else
  steps_args=(--max-seconds 4)
fi
# shellcheck disable=SC2086
part steps "$STEPS_S" "$py" -m benchmarks.gpu_steps --device "$DEVICE" --jsonl "$OUT/steps.jsonl" \
  --out "$OUT/steps.md" "${steps_args[@]}" ${STEPS_EXTRA:-} > "$OUT/steps.log" 2>&1

run=$OUT/rp20_200ep
if [ "$SMOKE" = 1 ]; then
  train_args=(--config config/recipes/digits/resnet_preact.yaml model.resnet_preact.depth 8
              model.resnet_preact.initial_channels 8 scheduler.epochs 1)
else
  part data "$DATA_S" "$py" -m imgclf data cifar10 --from .data/cifar10_jpg.tgz > "$OUT/data.log" 2>&1
  train_args=(--config config/recipes/cifar/resnet_preact.yaml model.resnet_preact.depth 20
              train.batch_size 128 train.base_lr 0.2 scheduler.type cosine scheduler.epochs "${EPOCHS:-200}"
              train.precision amp)
fi
# The rest of the budget, less 10 s to leave cleanly: the row's epochs reached are in train_log.csv.
# shellcheck disable=SC2086
part train "$(( $(left) - 10 ))" "$py" -m imgclf train --output-dir "$run" --quiet "${train_args[@]}" \
  device "$DEVICE" ${TRAIN_EXTRA:-} > "$OUT/train.log" 2>&1
rm -f "$run"/checkpoint*.pt  # weights are not worth the transfer; the log, env and result are
echo "total: $(( $(date +%s) - start )) s of $BUDGET_S" >> "$OUT/parts.log"
cat "$OUT/parts.log"
