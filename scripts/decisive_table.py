"""The decisive SeeCLIP table (docs/results.md): every method and ablation of a sweep file under
the paper's rule, the same runs under the operating point calibrated on source-only LODO folds,
and whether the folds rank the variants as the target does.

    python scripts/decisive_table.py --benchmark digits [--seeds 0 1 2] [--protocols full daml]
        [--validate-seeds 0] [--no-validate LABEL ...] [--jobs 2] [--runs-dir runs/digits]
        [--more-seeds 3 4 --more-if-std 2] [--report-only]

1. ``seeclip sweep --sweep sweeps/<benchmark>.yaml`` for the given seeds and protocols (finished
   runs are reused);
2. the same sweep with ``--validate lodo`` for ``--validate-seeds`` (LODO folds per run: each
   source domain in turn a pseudo-target, known classes held out by name; the target is never
   read), skipping ``--no-validate`` variants (by default the feature-diffusion ones, whose
   generator retrains per fold);
3. with ``--more-seeds``: those seeds too for every (protocol, variant) whose H under the paper's
   rule has a std over ``--seeds`` above ``--more-if-std`` points (the decisive table's rule: 5
   seeds where the std is over 2 points), and, after step 2, those seeds validated for every row
   whose H under ``lodo_threshold`` has a std over ``--validate-seeds`` above the same limit; the
   rule reads only the runs' target H spread, never picks a setting;
4. prints Markdown: per protocol, each variant's mean over targets under the paper's rule (mean ±
   std over seeds), AccU on hard/easy unknowns where the benchmark names them, the same under
   ``lodo_threshold`` with the fold H, and Spearman's rho between fold H and target H over
   (variant, target) pairs; which modules earn their place (declared with/without pairs of
   variants, H paired by seed and target, under both rules); then the per-target H tables; then
   the time it took.

Target numbers are only reported, never used to choose anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from seeclip.report import dedupe, paper_tables, read_records, under_rule
from seeclip.report_files import table_md
from seeclip.run_data import prepare_benchmark
from seeclip.selection import OWN_RULE, SETTING_SELECTIONS
from seeclip.sweep import load_sweep, plan, run_sweep
from seeclip.validation import LodoSettings

ROOT = Path(__file__).parents[1]


def _pm(values) -> str:
    v = np.array([x for x in values if x is not None], dtype=float) * 100
    if v.size == 0:
        return "n/a"
    return f"{v.mean():.1f}" if v.size == 1 else f"{v.mean():.1f} ± {v.std():.1f}"


def per_seed_means(records, key_fn):
    """variant -> [mean over targets of key_fn(record)] per seed (seeds with every target)."""
    by = defaultdict(lambda: defaultdict(dict))
    for r in records:
        by[r["method"]][r["seed"]][r["target"]] = key_fn(r)
    targets = {r["target"] for r in records}
    out = {}
    for method, seeds in by.items():
        out[method] = [
            float(np.mean([v for v in per_t.values() if v is not None]))
            for per_t in seeds.values()
            if set(per_t) == targets and any(v is not None for v in per_t.values())
        ]
    return out


def summary(records, order, hard_easy: bool) -> str:
    own = {
        k: per_seed_means(records, lambda r, k=k: r.get(k))
        for k in (
            "acc_known",
            "acc_unknown",
            "acc_unknown_hard",
            "acc_unknown_easy",
            "h_score",
            "auroc",
        )
    }
    validated = [r for r in records if r.get("rules", {}).get("lodo_threshold")]
    lodo = {
        "h": per_seed_means(validated, lambda r: r["rules"]["lodo_threshold"]["h_score"]),
        "fold": per_seed_means(validated, lambda r: r["validation"]["mean"]["h_score"]),
        "fold_cal": per_seed_means(
            validated, lambda r: r["validation"]["mean"].get("h_score_lodo_threshold")
        ),
    }
    cols = ["variant", "seeds", "Acc", "AccU"] + (["AccU hard", "AccU easy"] if hard_easy else [])
    cols += [
        "H (paper rule)",
        "AUROC",
        "fold H (own rule)",
        "fold H (calibrated)",
        "H (lodo_threshold)",
        "validated seeds",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for m in order:
        if m not in own["h_score"]:
            continue
        cells = [
            m,
            str(len(own["h_score"][m])),
            _pm(own["acc_known"][m]),
            _pm(own["acc_unknown"][m]),
        ]
        if hard_easy:
            cells += [_pm(own["acc_unknown_hard"][m]), _pm(own["acc_unknown_easy"][m])]
        cells += [
            _pm(own["h_score"][m]),
            _pm(own["auroc"][m]),
            _pm(lodo["fold"].get(m, [])),
            _pm(lodo["fold_cal"].get(m, [])),
            _pm(lodo["h"].get(m, [])),
            str(len(lodo["h"].get(m, []))),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noisy_rows(
    records, spec, max_std: float, *, rule: str = "own", seeds=None
) -> dict[str, list[str]]:
    """protocol -> the variant labels whose mean-over-targets H under ``rule`` (``own``: the
    paper's; ``lodo_threshold``: the calibrated one) has a std over ``seeds`` (default: the
    spec's) above ``max_std`` points."""
    seeds = spec.seeds if seeds is None else seeds
    out = {}
    for protocol in spec.protocols:
        rs = [
            r for r in under_rule(records, rule) if r["protocol"] == protocol and r["seed"] in seeds
        ]
        h = per_seed_means(rs, lambda r: r["h_score"])
        out[protocol] = [
            v.label
            for v in spec.variants
            if len(h.get(v.label, [])) > 1 and 100 * np.std(h[v.label]) > max_std
        ]
    return out


def rank_agreement(records) -> str:
    """Spearman's rho between fold H and target H over (variant, target, seed) runs."""
    validated = [r for r in records if r.get("rules", {}).get("lodo_threshold")]
    if len(validated) < 3:
        return "too few validated runs for a rank correlation"
    out = []
    for name, fold, target in (
        ("own rule", lambda r: r["validation"]["mean"]["h_score"], lambda r: r["h_score"]),
        (
            "calibrated",
            lambda r: r["validation"]["mean"].get("h_score_lodo_threshold"),
            lambda r: r["rules"]["lodo_threshold"]["h_score"],
        ),
    ):
        pairs = [
            (fold(r), target(r)) for r in validated if fold(r) is not None and target(r) is not None
        ]
        pooled = spearmanr(*np.array(pairs).T).statistic
        per_target = []
        for t in sorted({r["target"] for r in validated}):
            p = [
                (fold(r), target(r))
                for r in validated
                if r["target"] == t and fold(r) is not None and target(r) is not None
            ]
            if len(p) >= 3:
                per_target.append(f"{t} {spearmanr(*np.array(p).T).statistic:.2f}")
        out.append(
            f"- fold H vs target H, {name}: rho {pooled:.2f} pooled over {len(pairs)} "
            f"runs; within each target: {', '.join(per_target)}"
        )
    return "\n".join(out)


def lodo_h_picks(records) -> str:
    """Per (target, seed): the variant and operating rule `lodo_h` (seeclip.selection) picks
    from the validated runs' fold reports, its target H, and the best target H in hindsight.

    Every cell chooses from the same menu: the set of validated variants most (target, seed)
    cells have. Cells that lack one of them (seeds validated only for the noisy rows) are left
    out and counted, so a pick never looks better or worse for having fewer candidates."""
    validated = [r for r in records if r.get("rules", {}).get("lodo_threshold")]
    cells = defaultdict(dict)
    for r in validated:
        cells[(r["target"], r["seed"])][r["method"]] = r
    menus = Counter(frozenset(runs) for runs in cells.values())
    menu = max(menus, key=lambda m: (menus[m], len(m))) if menus else frozenset()
    lines, picked, skipped = [], [], 0
    for (t, s), all_runs in sorted(cells.items()):
        if not menu <= set(all_runs):
            skipped += 1
            continue
        runs = {m: all_runs[m] for m in menu}
        label, rule, fold = SETTING_SELECTIONS.get("lodo_h").choose(
            {m: r["validation"] for m, r in runs.items()}
        )
        chosen = runs[label]
        target = chosen["h_score"] if rule == OWN_RULE else chosen["rules"][rule]["h_score"]
        best = max(
            max(r["h_score"], r["rules"]["lodo_threshold"]["h_score"]) for r in runs.values()
        )
        picked.append((target, best))
        lines.append(
            f"- {t} seed {s}: lodo_h picks {label} ({rule}, fold H {fold:.3f}) -> "
            f"target H {target:.3f}; best in hindsight {best:.3f}"
        )
    if picked:
        mean = np.mean(picked, axis=0)
        lines.append(
            f"- mean target H of the picks {mean[0]:.3f}; of the best in hindsight "
            f"{mean[1]:.3f} ({len(picked)} cells, {len(menu)} candidate variants"
            f"{f'; left out, lacking some: {skipped}' if skipped else ''})"
        )
    return "\n".join(lines)


# Which modules earn their place: (question, variant with it, variant without it), read as the
# paired difference with - without on the same (seed, target). Pairs whose variants a sweep
# lacks are skipped; the glyph and digits presets differ in their pseudo-unknown source.
COMMON_QUESTIONS = (
    ("semantic tokens", "seeclip", "seeclip_no_sem"),
    ("L_rep (margin 0.5)", "seeclip", "seeclip_no_rep"),
    ("L_coh", "seeclip", "seeclip_no_coh"),
    ("the preset's pseudo-unknowns (vs none)", "seeclip", "seeclip_no_pseudo"),
    ("L_reg as the paper's sum (vs mean)", "seeclip_reg_sum", "seeclip"),
    ("L_rep margin 0.2 (vs 0.5)", "seeclip_margin_0.2", "seeclip"),
    ("a learned unknown prompt in CoOp (vs CoOp)", "coop_unknown", "coop"),
    ("SeeCLIP preset (vs CoOp)", "seeclip", "coop"),
)
QUESTIONS = {
    "glyphs": COMMON_QUESTIONS
    + (
        ("mixup pseudo-unknowns (vs the preset's image pool)", "seeclip_mixup", "seeclip"),
        ("feature diffusion (vs the preset's image pool)", "seeclip_feature_diffusion", "seeclip"),
        ("SDEdit images (vs the preset's from-noise images)", "seeclip_sdedit", "seeclip"),
        (
            "SeeCLIP's prompts and losses (vs CoOp's unknown prompt), both mixup",
            "seeclip_mixup",
            "coop_unknown",
        ),
        ("SeeCLIP with feature diffusion (vs CoOp)", "seeclip_feature_diffusion", "coop"),
    ),
    "digits": COMMON_QUESTIONS
    + (
        ("feature diffusion (vs the preset's mixup)", "seeclip_diffusion", "seeclip"),
        (
            "SeeCLIP's prompts and losses (vs CoOp's unknown prompt), both mixup",
            "seeclip",
            "coop_unknown",
        ),
        (
            "SeeCLIP's prompts and losses (vs CoOp's unknown prompt), both feature diffusion",
            "seeclip_diffusion",
            "coop_unknown_diffusion",
        ),
    ),
}
RULES = {"paper rule": "own", "lodo_threshold": "lodo_threshold"}  # column label -> report rule


def paired_effect(records, with_, without, targets) -> tuple[list[float], int]:
    """Per seed where both variants have an H for every one of ``targets``: the mean over targets
    of H(with) - H(without); and the number of targets whose mean difference over those seeds
    is positive. ``records`` are under one rule (``seeclip.report.under_rule``)."""
    by = defaultdict(dict)
    for r in records:
        if r["method"] in (with_, without) and r.get("h_score") is not None:
            by[(r["seed"], r["target"])][r["method"]] = r["h_score"]
    seeds = sorted({s for s, _ in by})
    paired = [s for s in seeds if all(len(by.get((s, t), {})) == 2 for t in targets)]
    diff = {(s, t): by[(s, t)][with_] - by[(s, t)][without] for s in paired for t in targets}
    per_seed = [float(np.mean([diff[(s, t)] for t in targets])) for s in paired]
    won = sum(np.mean([diff[(s, t)] for s in paired]) > 0 for t in targets) if paired else 0
    return per_seed, int(won)


def verdict(per_seed: list[float]) -> str:
    """ "helps"/"hurts" when the mean paired difference is over two standard errors (std with
    ddof 1 over seeds, over sqrt(n)) from 0, else "within noise"; one seed gives no verdict."""
    if len(per_seed) < 2:
        return "one seed" if per_seed else "n/a"
    d = np.array(per_seed)
    se = d.std(ddof=1) / np.sqrt(d.size)
    if abs(d.mean()) <= 2 * se:
        return "within noise"
    return "helps" if d.mean() > 0 else "hurts"


def module_effects(records, benchmark: str) -> str:
    """The 'which modules earn their place' table: for each declared question, H(with) -
    H(without) paired by seed and target, under the paper's rule and the calibrated one."""
    present = {r["method"] for r in records}
    targets = {r["target"] for r in records}
    by_rule = [under_rule(records, rule) for rule in RULES.values()]
    cols = ["question", "with", "without"]
    for rule in RULES:
        cols += [f"ΔH {rule}", "seeds", "targets won", "verdict"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for question, with_, without in QUESTIONS.get(benchmark, COMMON_QUESTIONS):
        if not {with_, without} <= present:
            continue
        cells = [question, with_, without]
        for rs in by_rule:
            per_seed, won = paired_effect(rs, with_, without, targets)
            won_cell = f"{won}/{len(targets)}" if per_seed else "n/a"
            cells += [_pm(per_seed), str(len(per_seed)), won_cell, verdict(per_seed)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_shares(records, runs_dir, order) -> str:
    """Each SeeCLIP-family variant's last-epoch loss terms and gradient shares (mean over runs),
    read from the runs' epoch records: which terms act at which setting."""
    from seeclip.records import read_records, run_dir_of

    keys = (
        "grad_share_ali",
        "grad_share_rep",
        "grad_share_coh",
        "grad_share_reg",
        "rep_active",
        "cos_uy",
    )
    rows = defaultdict(lambda: defaultdict(list))
    for r in records:
        epochs = [e for e in read_records(run_dir_of(runs_dir, r)) if e.get("kind") == "epoch"]
        if epochs and "grad_share_rep" in epochs[-1]:
            for k in keys:
                if epochs[-1].get(k) is not None:
                    rows[r["method"]][k].append(epochs[-1][k])
    lines = ["| variant | runs | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for m in order:
        if m in rows:
            n = len(rows[m]["grad_share_ali"])
            lines.append(
                f"| {m} | {n} | "
                + " | ".join(f"{np.mean(rows[m][k]):.3f}" if rows[m][k] else "n/a" for k in keys)
                + " |"
            )
    return "\n".join(lines)


def more_seed_configs(records, spec, args, *, rule: str, seeds) -> list:
    """The ``--more-seeds`` configs of every (protocol, variant) whose H under ``rule`` has a
    std over ``seeds`` above ``--more-if-std`` points; says which rows they are."""
    more = noisy_rows(records, spec, args.more_if_std, rule=rule, seeds=seeds)
    for protocol, labels in more.items():
        print(
            f"{protocol}: {rule} H std > {args.more_if_std} points over seeds {list(seeds)} "
            f"-> seeds {args.more_seeds} for {', '.join(labels)}"
        )
    return [
        c
        for c in plan(dataclasses.replace(spec, seeds=tuple(args.more_seeds)))
        if (c.label or c.method) in more.get(c.data.protocol, ())
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", default="digits")
    p.add_argument("--sweep", help="default: sweeps/<benchmark>.yaml")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--protocols", nargs="+")
    p.add_argument("--validate-seeds", type=int, nargs="*", default=[0])
    p.add_argument(
        "--no-validate",
        nargs="*",
        help="variant labels not validated (default: those with diffusion in the label)",
    )
    p.add_argument("--class-splits", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs-dir")
    p.add_argument(
        "--more-seeds",
        type=int,
        nargs="*",
        default=[],
        help="extra seeds for the rows whose H std over --seeds is too large",
    )
    p.add_argument(
        "--more-if-std",
        type=float,
        default=2.0,
        help="H std (points) above which a row gets --more-seeds (default 2)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: print the tables of the finished runs of the sweep's "
        "variants in --runs-dir",
    )
    args = p.parse_args()
    start = time.perf_counter()
    spec = load_sweep(args.sweep or ROOT / "sweeps" / f"{args.benchmark}.yaml")
    spec = dataclasses.replace(spec, config=str(ROOT / spec.config))
    if args.seeds:
        spec = dataclasses.replace(spec, seeds=tuple(args.seeds))
    if args.protocols:
        spec = dataclasses.replace(spec, protocols=tuple(args.protocols))
    runs_dir = args.runs_dir or f"runs/{args.benchmark}"
    prepare_benchmark(args.benchmark, progress=False)
    order = [v.label for v in spec.variants]
    configs = plan(spec)
    if args.report_only:
        wanted = {
            "seed": spec.seeds + tuple(args.more_seeds),
            "protocol": spec.protocols,
            "method": order,
        }
        records = [
            r
            for r in dedupe(read_records(runs_dir))
            if all(r.get(k) in v for k, v in wanted.items())
        ]
        return print_tables(records, spec, order, runs_dir, args, start)
    paper = run_sweep(configs, runs_dir=runs_dir, jobs=args.jobs)
    if args.more_seeds:
        extra = more_seed_configs(paper.records, spec, args, rule="own", seeds=spec.seeds)
        paper.outcomes.extend(run_sweep(extra, runs_dir=runs_dir, jobs=args.jobs).outcomes)
    skip = set(
        args.no_validate
        if args.no_validate is not None
        else [lab for lab in order if "diffusion" in lab]
    )
    to_validate = [
        c for c in configs if c.seed in args.validate_seeds and (c.label or c.method) not in skip
    ]
    settings = LodoSettings(class_splits=args.class_splits)
    validated = run_sweep(to_validate, runs_dir=runs_dir, jobs=args.jobs, validate=settings)
    if args.more_seeds and args.validate_seeds:
        extra = more_seed_configs(
            validated.records, spec, args, rule="lodo_threshold", seeds=args.validate_seeds
        )
        validated.outcomes.extend(
            run_sweep(extra, runs_dir=runs_dir, jobs=args.jobs, validate=settings).outcomes
        )
    by_hash = {r["config_hash"]: r for r in paper.records}
    by_hash.update({r["config_hash"]: r for r in validated.records})
    records = list(by_hash.values())
    print_tables(records, spec, order, runs_dir, args, start)


def print_tables(records, spec, order, runs_dir, args, start) -> None:
    hard_easy = any(r.get("acc_unknown_hard") is not None for r in records)
    for protocol in spec.protocols:
        # the sweep's row order, whether the records come from this run or from disk
        rs = sorted(
            (r for r in records if r["protocol"] == protocol),
            key=lambda r: order.index(r["method"]),
        )
        print(f"\n### {args.benchmark} / {protocol}: mean over targets\n")
        print(summary(rs, order, hard_easy))
        print()
        print(rank_agreement(rs))
        print(lodo_h_picks(rs))
        print(
            f"\nWhich modules earn their place ({protocol}; ΔH = with - without, paired by "
            f"seed and target, mean ± std over seeds; 'helps'/'hurts' beyond two standard "
            f"errors):\n"
        )
        print(module_effects(rs, args.benchmark))
        print(f"\nLast-epoch gradient shares and L_rep activity ({protocol}, every seed):\n")
        print(loss_shares(rs, runs_dir, order))
        for t in paper_tables(rs, ["h_score"]):
            print(f"\n{t.title}, paper rule, per target\n\n{table_md(t)}")
        cal = under_rule(rs, "lodo_threshold")
        for t in paper_tables(cal, ["h_score"]) if cal else []:
            print(f"\n{t.title}, lodo_threshold, per target\n\n{table_md(t)}")
    fit = sum(r.get("fit_seconds") or 0 for r in records)
    val = sum((r.get("validation") or {}).get("seconds") or 0 for r in records)
    print(
        f"\n{len(records)} runs; this invocation {time.perf_counter() - start:.0f} s wall "
        f"({args.jobs} processes); recorded fit time {fit / 60:.0f} min, LODO validation "
        f"{val / 60:.0f} min (one thread each)"
    )
    print(f"data: {sorted({r['data_hash'][:16] for r in records})}")


if __name__ == "__main__":
    main()
