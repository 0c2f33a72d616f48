#!/usr/bin/env bash
# The epoch table's rows: the `cifar10` recipe for a fixed number of epochs, one run per seed.
#   benchmarks/cifar/epochs.sh EPOCHS [SEEDS...]      (default seeds 0 1 2)
# A run whose folder holds state.pt is continued (--resume); a finished one is skipped.
# Each run's test top-1 (flip TTA) is the last "test" line of RUN/metrics.jsonl.
# An ablation row: ABLATION=ema EXTRA="--ema-decay 0.999" benchmarks/cifar/epochs.sh 10 0
#   -> runs/cifar10-10ep-ema-seed0, the recipe with EXTRA's options added.
# Another recipe: RECIPE=cifar10_plain ABLATION=plain benchmarks/cifar/epochs.sh 10 0
set -euo pipefail
epochs=$1; shift
seeds=${*:-0 1 2}
data=${DATA:-../shared/data/cifar-10-batches-bin}
vitlab=${VITLAB:-.venv/bin/vitlab}
for seed in $seeds; do
  out=runs/cifar10-${epochs}ep${ABLATION:+-$ABLATION}-seed${seed}
  if [ -f "$out/config.json" ] && python3 -c '
import json, sys
run = sys.argv[1]
steps = json.load(open(run + "/config.json"))["train"]["steps"]
rows = [json.loads(line) for line in open(run + "/metrics.jsonl")]
sys.exit(0 if any(r.get("step") == steps and "eval_top1" in r for r in rows) else 1)' "$out" 2>/dev/null; then
    echo "done: $out"; continue
  fi
  if [ -f "$out/state.pt" ]; then
    "$vitlab" train --resume "$out"
  else
    "$vitlab" train --recipe "${RECIPE:-cifar10}" --data "$data" --epochs "$epochs" --seed "$seed" \
      --eval-every 1000000 --checkpoint-every 500 ${EXTRA:-} --out "$out"
  fi
done
