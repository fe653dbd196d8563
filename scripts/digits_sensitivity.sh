#!/usr/bin/env bash
# sigma and g sensitivity of SeeCLIP with feature-space diffusion pseudo-unknowns on the embedded
# digits benchmark, `full` protocol, every target, seed 0 (the generator is trained once per
# source set and only re-sampled for each sigma / g).
#   bash scripts/digits_sensitivity.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs/digits_sensitivity}
SEECLIP=${SEECLIP:-seeclip}
"$SEECLIP" prepare digits --no-progress > /dev/null
common="--config configs/digits.yaml --protocol full --seed 0 --threads 1 --no-progress --runs-dir $RUNS"
common="$common method=seeclip train.pseudo_unknowns=diffusion diffusion.seed=0"
printf '%s\n' \
  "label=sigma_0.1 diffusion.sigma=0.1" "label=sigma_0.2 diffusion.sigma=0.2" \
  "label=sigma_0.3 diffusion.sigma=0.3" "label=sigma_0.4 diffusion.sigma=0.4" \
  "label=g_5 diffusion.guidance=5" "label=g_25 diffusion.guidance=25" |
  xargs -P "${JOBS:-2}" -I{} sh -c "$SEECLIP train $common {} > /dev/null"
"$SEECLIP" report --runs-dir "$RUNS" --benchmark digits --means-only
