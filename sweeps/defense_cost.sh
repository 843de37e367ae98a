#!/usr/bin/env bash
# The defense-cost comparison as plain `fedjaxpriv run` calls (one run directory each), then a report.
# Usage: sweeps/defense_cost.sh [OUT_DIR] [DATASET]   (defaults: runs/defense_cost_sh digits)
set -euo pipefail
OUT="${1:-runs/defense_cost_sh}"
DATASET="${2:-digits}"
COMMON=(--quiet --set "data.dataset=${DATASET}" --set data.num_clients=30 --set data.synthetic_max_size=300
        --set client.local_steps=5 --set server.clients_per_round=10 --set run.rounds=15 --set run.eval_every=5)

declare -A DEFENSES=(
  [baseline]=""
  [prune50]="client.prune_sparsity=0.5"
  [quant4bit]="message.quant_bits=4"
  [topk10]="message.topk_fraction=0.1"
  [mixup]="client.mixup_alpha=1.0"
  [poisson]="client.sampling=poisson server.client_sampling=poisson"
  [dpsgd]="client.dp_clip_norm=1.0 client.dp_noise_multiplier=1.0"
  [dpfedavg]="server.central_clip_norm=1.0 server.central_noise_multiplier=1.0 server.weighting=uniform"
)

dirs=()
for name in "${!DEFENSES[@]}"; do
  sets=()
  for kv in ${DEFENSES[$name]}; do sets+=(--set "$kv"); done
  fedjaxpriv run "${COMMON[@]}" "${sets[@]}" --set "name=${name}" --out "${OUT}/${DATASET}-${name}"
  dirs+=("${OUT}/${DATASET}-${name}")
done
fedjaxpriv report "${dirs[@]}" --out "${OUT}/report"
