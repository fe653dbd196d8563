"""scripts/decisive_table.py: which rows get more seeds (5 seeds where the H std over 3 seeds
exceeds 2 points), read from the records' target H only."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from seeclip.report import under_rule
from seeclip.sweep import SweepSpec, Variant


def _records(method, protocol, h_by_seed, targets=("a", "b")):
    return [
        {"method": method, "protocol": protocol, "seed": s, "target": t, "h_score": h}
        for s, h in enumerate(h_by_seed)
        for t in targets
    ]


def test_rows_whose_h_std_exceeds_the_limit_get_more_seeds_per_protocol(load_script):
    noisy_rows = load_script("decisive_table").noisy_rows
    spec = SweepSpec(
        config="c.yaml",
        variants=(Variant("steady", ()), Variant("noisy", ())),
        protocols=("full", "daml"),
        seeds=(0, 1, 2),
    )
    records = (
        _records("steady", "full", [0.50, 0.51, 0.52])  # std 0.8 points
        + _records("noisy", "full", [0.10, 0.15, 0.12])  # std 2.1 points
        + _records("steady", "daml", [0.40, 0.45, 0.50])  # std 4.1 points
        + _records("noisy", "daml", [0.30, 0.30, 0.30])
    )
    assert noisy_rows(records, spec, 2.0) == {"full": ["noisy"], "daml": ["steady"]}
    assert noisy_rows(records, spec, 5.0) == {"full": [], "daml": []}
    # a seed outside the spec's seeds (a row that already has seed 3) does not move the rule
    extra = _records("steady", "full", [0.0, 0.0, 0.0, 0.9])[-2:]
    assert noisy_rows(records + extra, spec, 2.0)["full"] == ["noisy"]


def test_the_calibrated_rule_asks_for_more_seeds_from_its_own_spread_over_validated_seeds(
    load_script,
):
    noisy_rows = load_script("decisive_table").noisy_rows
    spec = SweepSpec(
        config="c.yaml",
        variants=(Variant("steady", ()), Variant("noisy", ())),
        protocols=("full",),
        seeds=(0, 1, 2),
    )
    # paper-rule H is steady for both; calibrated H (rules.lodo_threshold) is not for "noisy"
    records = [
        {**r, "rules": {"lodo_threshold": {"h_score": cals[r["seed"]]}}}
        for label, cals in (("steady", [0.6, 0.6, 0.61]), ("noisy", [0.4, 0.5, 0.6]))
        for r in _records(label, "full", [0.3, 0.3, 0.3])
    ]
    assert noisy_rows(records, spec, 2.0) == {"full": []}
    assert noisy_rows(records, spec, 2.0, rule="lodo_threshold") == {"full": ["noisy"]}
    # only the validated seeds count; an unvalidated run has no calibrated H
    assert noisy_rows(records, spec, 2.0, rule="lodo_threshold", seeds=[0]) == {"full": []}
    unvalidated = [{k: v for k, v in r.items() if k != "rules"} for r in records]
    assert noisy_rows(unvalidated, spec, 2.0, rule="lodo_threshold") == {"full": []}


def _h(method, seed, target, h, calibrated=None):
    r = {"method": method, "protocol": "full", "seed": seed, "target": target, "h_score": h}
    if calibrated is not None:
        r["rules"] = {"lodo_threshold": {"h_score": calibrated}}
    return r


def test_module_effects_pair_runs_by_seed_and_target_and_call_only_clear_differences(load_script):
    script = load_script("decisive_table")
    # with - without: seed 0 (+0.10, +0.00), seed 1 (+0.08, +0.02), seed 2 (+0.06, +0.04)
    records = [
        _h("seeclip", s, t, 0.5 + d, calibrated=0.6 if s == 0 else None)
        for s, ds in enumerate([(0.10, 0.00), (0.08, 0.02), (0.06, 0.04)])
        for t, d in zip("ab", ds, strict=True)
    ] + [
        _h("seeclip_no_sem", s, t, 0.5, calibrated=0.7 if s == 0 else None)
        for s in range(3)
        for t in "ab"
    ]
    per_seed, won = script.paired_effect(records, "seeclip", "seeclip_no_sem", {"a", "b"})
    assert per_seed == pytest.approx([0.05, 0.05, 0.05])
    assert won == 2
    assert script.verdict(per_seed) == "helps"
    # a seed that lacks a target in either variant is not paired
    partial = [
        r
        for r in records
        if not (r["seed"] == 2 and r["target"] == "b" and r["method"] == "seeclip_no_sem")
    ]
    assert len(script.paired_effect(partial, "seeclip", "seeclip_no_sem", {"a", "b"})[0]) == 2
    # the calibrated rule reads rules.lodo_threshold; only seed 0 was validated here
    cal, won = script.paired_effect(
        under_rule(records, "lodo_threshold"), "seeclip", "seeclip_no_sem", {"a", "b"}
    )
    assert cal == pytest.approx([-0.1]) and won == 0
    assert script.verdict(cal) == "one seed"
    assert script.verdict([0.1, -0.1, 0.05]) == "within noise"
    assert script.verdict([-0.05, -0.06, -0.04]) == "hurts"
    table = script.module_effects(records, "glyphs").splitlines()
    # only the question whose two variants ran appears
    assert len(table) == 3
    assert table[2].startswith(
        "| semantic tokens | seeclip | seeclip_no_sem | 5.0 ± 0.0 | 3 | 2/2 |"
    )
    assert table[2].endswith("| -10.0 | 1 | 0/2 | one seed |")


def _validated(method, seed, target, fold, h, cal):
    return {
        "method": method,
        "seed": seed,
        "target": target,
        "h_score": h,
        "rules": {"lodo_threshold": {"h_score": cal}},
        "validation": {"mean": {"h_score": fold, "h_score_lodo_threshold": fold}},
    }


def test_lodo_h_picks_choose_from_the_same_menu_in_every_cell(load_script):
    lodo_h_picks = load_script("decisive_table").lodo_h_picks
    # seed 0: both variants validated, "good" has the better folds; seed 3: only "noisy" was
    # validated (a row given more seeds), so that cell offers no real choice and is left out
    records = [
        _validated("good", 0, "a", fold=0.9, h=0.2, cal=0.7),
        _validated("noisy", 0, "a", fold=0.5, h=0.1, cal=0.8),
        _validated("good", 1, "a", fold=0.4, h=0.3, cal=0.6),
        _validated("noisy", 1, "a", fold=0.6, h=0.5, cal=0.4),
        _validated("noisy", 3, "a", fold=0.99, h=0.0, cal=0.0),
    ]
    text = lodo_h_picks(records)
    assert (
        "a seed 0: lodo_h picks good (own, fold H 0.900) -> target H 0.200; best in hindsight "
        "0.800" in text
    )
    assert "a seed 1: lodo_h picks noisy (own, fold H 0.600) -> target H 0.500" in text
    assert "seed 3" not in text
    assert text.endswith(
        "mean target H of the picks 0.350; of the best in hindsight 0.700 "
        "(2 cells, 2 candidate variants; left out, lacking some: 1)"
    )


def test_tables_keep_the_sweeps_row_order_whatever_order_the_records_come_in(
    tmp_path, capsys, load_script
):
    script = load_script("decisive_table")
    spec = SweepSpec(
        config="c.yaml",
        variants=(Variant("zeroshot", ()), Variant("coop", ())),
        protocols=("full",),
        seeds=(0,),
    )
    # read from disk, runs come in folder order: "coop" before "zeroshot"
    records = [
        {**_h(m, 0, t, 0.5), "benchmark": "glyphs", "config_hash": m + t, "data_hash": "d"}
        for m in ("coop", "zeroshot")
        for t in "ab"
    ]
    args = SimpleNamespace(benchmark="glyphs", jobs=1)
    script.print_tables(records, spec, ["zeroshot", "coop"], tmp_path, args, time.perf_counter())
    rows = [
        line.split(" | ")[0]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| zeroshot") or line.startswith("| coop")
    ]
    assert rows and rows == ["| zeroshot", "| coop"] * (len(rows) // 2)
