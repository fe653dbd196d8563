#!/usr/bin/env bash
# Reproduces the tables of docs/results.md: every method on the embedded digits benchmark with
# the shipped tiny-digits CLIP, both split families, every target domain, seeds 0 1 2.
# The diffusion rows share one pseudo-unknown pool per source set (diffusion.seed=0): the pool
# is generated once per (source set, generator config, seed) and reused by every run seed.
# Two processes run at a time, one torch thread each (tiny models: threads only add overhead).
#   bash scripts/digits_results.sh [RUNS_DIR]
set -euo pipefail
RUNS=${1:-runs/digits}
SEECLIP=${SEECLIP:-seeclip}
"$SEECLIP" prepare digits --no-progress
# fill the feature cache once, before two processes would race to build it
"$SEECLIP" eval --config configs/digits.yaml --target handwritten --runs-dir "$RUNS" \
  --no-progress method=zeroshot > /dev/null

jobs=()
for protocol in full daml; do
  for variant in \
    "method=zeroshot" \
    "method=coop" \
    "method=coop_unknown" \
    "method=seeclip" \
    "method=seeclip label=seeclip_no_sem prompt.semantic_tokens=false" \
    "method=seeclip label=seeclip_no_rep loss.alpha=0" \
    "method=seeclip label=seeclip_no_coh loss.beta=0" \
    "method=seeclip label=seeclip_no_pseudo train.pseudo_unknowns=none" \
    "method=seeclip label=seeclip_diffusion train.pseudo_unknowns=diffusion diffusion.seed=0" \
    "method=coop_unknown label=coop_unknown_diffusion train.pseudo_unknowns=diffusion diffusion.seed=0"; do
    jobs+=("--protocol $protocol $variant")
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} sh -c \
  "$SEECLIP train --config configs/digits.yaml --runs-dir $RUNS --seed 0 1 2 --threads 1 --no-progress {} > /dev/null"
"$SEECLIP" report --runs-dir "$RUNS" --benchmark digits --means-only
"$SEECLIP" report --runs-dir "$RUNS" --benchmark digits
