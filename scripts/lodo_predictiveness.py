"""Does source-only LODO validation rank settings the way the target does?

For each declared variant (the digits results table's methods and SeeCLIP ablations) and each
target domain: the target run (`seeclip train`) and its LODO validation on the sources
(`--validate lodo`; fold reports cached under RUNS/_lodo/). Printed per target and pooled:
mean fold H against target H under the method's own rule and under the fold-calibrated
threshold (lodo_threshold), Spearman's rho between the two rankings, which variant the
`lodo_h` rule would pick and what it loses against the best variant in hindsight (the target
numbers are used only for this diagnosis, never for a choice).

    python scripts/lodo_predictiveness.py [--benchmark digits] [--protocol full] [--seeds 0]
        [--class-splits 2] [--runs-dir runs/lodo] [--only LABEL ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from seeclip.config import apply_overrides
from seeclip.datasets import get_benchmark
from seeclip.run_config import load_config
from seeclip.run_data import prepare_benchmark
from seeclip.runner import run_eval
from seeclip.selection import SETTING_SELECTIONS
from seeclip.validation import LodoSettings, attach_validation, cached_lodo

ROOT = Path(__file__).parents[1]
VARIANTS = {
    "zeroshot": ["method=zeroshot"],
    "coop": ["method=coop"],
    "coop_unknown": ["method=coop_unknown"],
    "seeclip": ["method=seeclip"],
    "seeclip_no_sem": ["method=seeclip", "prompt.semantic_tokens=false"],
    "seeclip_no_rep": ["method=seeclip", "loss.alpha=0"],
    "seeclip_no_pseudo": ["method=seeclip", "train.pseudo_unknowns=none"],
    "seeclip_diffusion": ["method=seeclip", "train.pseudo_unknowns=diffusion", "diffusion.seed=0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="digits")
    parser.add_argument("--protocol", default="full")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--class-splits", type=int, default=2)
    parser.add_argument("--runs-dir", default="runs/lodo")
    parser.add_argument("--only", nargs="+", help="variant labels to run (default: all)")
    parser.add_argument("--targets", nargs="+", help="default: every target")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prepare_benchmark(args.benchmark, progress=False)  # an embedded benchmark: generated once
    base = load_config(ROOT / "configs" / f"{args.benchmark}.yaml")
    base = apply_overrides(base, [f"data.protocol={args.protocol}"])
    targets = args.targets or list(get_benchmark(args.benchmark).targets)
    settings = LodoSettings(class_splits=args.class_splits)
    store = Path(args.runs_dir) / "_lodo"
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    start = time.perf_counter()
    rows = []  # (target, seed, label, fold_own, target_own, fold_thr, target_thr)
    for seed in args.seeds:
        for target in targets:
            for label, overrides in variants.items():
                cfg = apply_overrides(base, [*overrides, f"label={label}", f"data.target={target}"])
                cfg = dataclasses.replace(cfg, seed=seed)
                result = run_eval(cfg, runs_dir=args.runs_dir, progress=False)
                report = cached_lodo(cfg, settings, store, progress=False)
                record = attach_validation(result.run_dir, report)
                rows.append(
                    (
                        target,
                        seed,
                        label,
                        report["mean"]["h_score"],
                        record["h_score"],
                        report["mean"]["h_score_lodo_threshold"],
                        record["rules"]["lodo_threshold"]["h_score"],
                    )
                )
                print(
                    f"{target:<12} seed {seed} {label:<20} fold H {rows[-1][3]:.3f} "
                    f"target H {rows[-1][4]:.3f} | thr: fold {rows[-1][5]:.3f} "
                    f"target {rows[-1][6]:.3f}",
                    flush=True,
                )
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\n{args.benchmark}/{args.protocol}, seeds {args.seeds}, {settings}, {minutes:.1f} min\n"
    )
    print(
        "| target | seed | rho (own rule) | rho (lodo_threshold) | rho (both rules pooled) | "
        "lodo_h picks | its target H | best target H |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rule = SETTING_SELECTIONS.get("lodo_h")
    for target in targets:
        for seed in args.seeds:
            sub = [r for r in rows if r[0] == target and r[1] == seed]
            if len(sub) < 3:
                continue
            f_own, t_own = [r[3] for r in sub], [r[4] for r in sub]
            f_thr, t_thr = [r[5] for r in sub], [r[6] for r in sub]
            rho_own = spearmanr(f_own, t_own).statistic
            rho_thr = spearmanr(f_thr, t_thr).statistic
            rho_all = spearmanr(f_own + f_thr, t_own + t_thr).statistic
            reports = {
                r[2]: {"mean": {"h_score": r[3], "h_score_lodo_threshold": r[5]}} for r in sub
            }
            label, which, _ = rule.choose(reports)
            pick = next(r for r in sub if r[2] == label)
            got = pick[4] if which == "own" else pick[6]
            print(
                f"| {target} | {seed} | {rho_own:.2f} | {rho_thr:.2f} | {rho_all:.2f} | "
                f"{label} ({which}) | {got:.3f} | {max(t_own + t_thr):.3f} |"
            )
    f_all = [r[3] for r in rows] + [r[5] for r in rows]
    t_all = [r[4] for r in rows] + [r[6] for r in rows]
    if len(rows) >= 3:
        print(
            f"\npooled over targets, seeds, variants and rules: Spearman rho "
            f"{spearmanr(f_all, t_all).statistic:.2f} (n = {len(f_all)}); mean target H of "
            f"the lodo_threshold rule {np.mean([r[6] for r in rows]):.3f} vs the own rule "
            f"{np.mean([r[4] for r in rows]):.3f}"
        )


if __name__ == "__main__":
    main()
