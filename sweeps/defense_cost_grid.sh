#!/usr/bin/env bash
# The defense-cost grid through the results store (resumable: rerun to finish interrupted runs).
# Usage: sweeps/defense_cost_grid.sh [STORE_DIR] [JOBS]
set -euo pipefail
STORE="${1:-runs/defense_cost}"
JOBS="${2:-2}"
HERE="$(cd "$(dirname "$0")" && pwd)"
fedjaxpriv sweep "${HERE}/defense_cost.yaml" --jobs "${JOBS}" --store "${STORE}"
fedjaxpriv report "${STORE}" --out "${STORE}/report"
