import pytest

from seeclip.report import ReportError, summarize


def rec(method, target, seed, h, auroc=None):
    return {
        "benchmark": "b",
        "protocol": "full",
        "method": method,
        "target": target,
        "seed": seed,
        "acc_known": 0.5,
        "acc_unknown": 0.5,
        "h_score": h,
        "closed_set_acc": 0.5,
        "auroc": auroc,
        "oscr": 0.25,
    }


def test_cells_are_mean_and_std_over_seeds_and_mean_row_averages_targets_first():
    records = [
        rec("m", "t1", 0, 0.2),
        rec("m", "t1", 1, 0.4),
        rec("m", "t2", 0, 0.6),
        rec("m", "t2", 1, 0.8),
    ]
    table = summarize(records, metrics=("h_score", "auroc"))
    rows = {line.split("|")[4].strip(): line for line in table.splitlines()[2:]}
    assert "| 30.0 ± 10.0 | n/a |" in rows["t1"]
    # per-seed means over targets: seed 0 -> 0.4, seed 1 -> 0.6 => 50.0 ± 10.0
    assert "| 50.0 ± 10.0 | n/a |" in rows["**mean**"]
    means_only = summarize(records, metrics=("h_score",), per_target=False)
    assert len(means_only.splitlines()) == 3 and "**mean**" in means_only


def test_a_run_counts_once_and_epoch_records_are_ignored():
    runs = [dict(rec("m", "t1", 0, 0.2), config_hash="a", setting_hash="s") for _ in range(3)]
    runs.append(dict(rec("m", "t1", 1, 0.4), config_hash="b", setting_hash="s"))
    runs.append({"kind": "epoch", "config_hash": "a", "loss_total": 1.0})
    (row,) = [x for x in summarize(runs, metrics=("h_score",)).splitlines() if "| t1 |" in x]
    assert "| t1 | 2 | 30.0 ± 10.0 |" in row  # seeds 0 and 1, each once


def test_one_label_for_two_settings_names_both_and_the_keys():
    a = dict(rec("m", "t1", 0, 0.2), config_hash="a", setting_hash="s1",
             config={"seed": 0, "train": {"epochs": 2}})  # fmt: skip
    b = dict(rec("m", "t2", 0, 0.2), config_hash="b", setting_hash="s2",
             config={"seed": 1, "train": {"epochs": 3}})  # fmt: skip
    with pytest.raises(ReportError, match=r"s1 and s2, which differ in train.epochs \(2 vs 3\)"):
        summarize([a, b])
