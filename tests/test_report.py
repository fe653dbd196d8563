import csv
import html
import io

import pytest

from seeclip.report import Cell, ReportError, paper_tables, summarize
from seeclip.report_files import write_report


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
    a = dict(
        rec("m", "t1", 0, 0.2),
        config_hash="a",
        setting_hash="s1",
        config={"seed": 0, "train": {"epochs": 2}},
    )
    b = dict(
        rec("m", "t2", 0, 0.2),
        config_hash="b",
        setting_hash="s2",
        config={"seed": 1, "train": {"epochs": 3}},
    )
    with pytest.raises(ReportError, match=r"s1 and s2, which differ in train.epochs \(2 vs 3\)"):
        summarize([a, b])


# ------------------------------------------------- means over targets with missing or extra cells


def _hashed(method, target, seed, h):
    return dict(
        rec(method, target, seed, h),
        config_hash=f"{method}-{target}-{seed}",
        setting_hash=f"{method}-setting",
    )


def _mean_row(table: str, method: str = "m") -> list[str]:
    (row,) = [x for x in table.splitlines() if f"| {method} | **mean** |" in x]
    return [c.strip() for c in row.strip("|").split("|")]


def test_a_seed_missing_a_target_is_left_out_of_the_mean_and_named():
    # seed 0 has both targets (mean 0.4); seed 1 lacks t2. Averaging what is there would print
    # "40.0 ± 0.0" (seed 1's t1 alone is 0.4): a mean over a different set of targets per seed.
    records = [_hashed("m", "t1", 0, 0.2), _hashed("m", "t2", 0, 0.6), _hashed("m", "t1", 1, 0.4)]
    table = summarize(records, metrics=("h_score",))
    assert _mean_row(table) == ["b", "full", "m", "**mean**", "1", "40.0 †"]
    assert table.splitlines()[-1] == (
        "† m: mean over the seeds with every target only; missing t2 seed 1"
    )
    (paper,) = paper_tables(records, ["h_score"])
    assert paper.cells["m"]["mean"] == Cell(pytest.approx(0.4), 0.0, 1, ("t2 seed 1",))


def test_extra_seeds_on_one_target_enter_its_cell_but_not_the_mean():
    records = [
        _hashed("m", t, s, h)
        for t, s, h in [
            ("t1", 0, 0.2),
            ("t2", 0, 0.4),
            ("t1", 1, 0.6),
            ("t2", 1, 0.8),
            ("t1", 2, 1.0),
        ]
    ]
    table = summarize(records, metrics=("h_score",))
    (t1,) = [x for x in table.splitlines() if "| t1 |" in x]
    # t1 over seeds 0-2: 0.2, 0.6, 1.0 -> 60.0 ± 32.7 (population std, by hand)
    assert "| t1 | 3 | 60.0 ± 32.7 |" in t1
    # the mean over targets: seed 0 -> 0.3, seed 1 -> 0.7 -> 50.0 ± 20.0; seed 2 left out
    assert _mean_row(table) == ["b", "full", "m", "**mean**", "2", "50.0 ± 20.0 †"]
    assert "missing t2 seed 2" in table


def test_a_metric_missing_on_one_target_marks_the_mean_incomplete():
    records = [_hashed("m", "t1", 0, 0.2), _hashed("m", "t2", 0, 0.6)]
    records[1]["auroc"] = None
    records[0]["auroc"] = 0.9
    (row,) = [r for r in paper_tables(records, ["auroc"])[0].rows() if r[0] == "m"]
    assert row == ("m", "90.0", "n/a", "incomplete †")
    # a metric no run has is not applicable, not incomplete
    (row,) = paper_tables([_hashed("m", "t1", 0, 0.2), _hashed("m", "t2", 0, 0.6)], ["auroc"])[
        0
    ].rows()
    assert row == ("m", "n/a", "n/a", "n/a")


def test_two_runs_for_one_cell_are_an_error_not_an_average():
    a = _hashed("m", "t1", 0, 0.2)
    b = dict(a, config_hash="other", h_score=0.8)
    with pytest.raises(ReportError, match=r"two runs of 'm' \(b/full\) for target 't1' seed 0"):
        summarize([a, b])
    with pytest.raises(ReportError, match="remove one run folder"):
        paper_tables([a, b])
    # the same run read twice (same config hash) is one run
    assert (
        _mean_row(summarize([a, dict(a), _hashed("m", "t2", 0, 0.4)], metrics=("h_score",)))[-1]
        == "30.0"
    )


def test_every_format_shows_the_same_numbers_for_the_same_records(tmp_path):
    records = [
        _hashed("m", "t1", 0, 0.2),
        _hashed("m", "t2", 0, 0.6),
        _hashed("m", "t1", 1, 0.4),
        _hashed("n", "t1", 0, 0.1),
        _hashed("n", "t2", 0, 0.3),
        _hashed("n", "t1", 1, 0.5),
        _hashed("n", "t2", 1, 0.9),
    ]
    # by hand: m -> seed 0 only, 40.0, t2 seed 1 missing; n -> seeds 0.2 and 0.7 -> 45.0 ± 25.0
    expected = {"m": "40.0 †", "n": "45.0 ± 25.0"}
    text = summarize(records, metrics=("h_score",))
    assert {m: _mean_row(text, m)[-1] for m in expected} == expected
    write_report(records, tmp_path, runs_dir=tmp_path, plots=False)
    md = (tmp_path / "tables.md").read_text()
    tex = (tmp_path / "tables.tex").read_text()
    page = (tmp_path / "index.html").read_text()
    h_md = md.split("### b / full: H")[1].split("###")[0]
    for method, cell in expected.items():
        assert f"| {method} | " in h_md and h_md.split(f"| {method} | ")[1].split("\n")[0].rstrip(
            " |"
        ).endswith(cell)
        tex_cell = cell.replace("±", r"$\pm$").replace("†", r"$^\dagger$")
        assert any(
            line.startswith(f"{method} & ") and line.endswith(f"{tex_cell} \\\\")
            for line in tex.splitlines()
        )
        assert f"<td>{cell}</td></tr>" in page
    note = "† m: mean over the seeds with every target only; missing t2 seed 1"
    assert note in h_md and html.escape(note) in page
    assert r"$^\dagger$ m: mean over the seeds" in tex
    rows = [
        r
        for r in csv.DictReader(io.StringIO((tmp_path / "tables.csv").read_text()))
        if r["metric"] == "h_score" and r["target"] == "mean"
    ]
    by_method = {r["method"]: r for r in rows}
    assert float(by_method["m"]["mean"]) == pytest.approx(0.4)
    assert (by_method["m"]["seeds"], by_method["m"]["missing"]) == ("1", "t2 seed 1")
    assert float(by_method["n"]["mean"]) == pytest.approx(0.45)
    assert float(by_method["n"]["std"]) == pytest.approx(0.25)
    assert (by_method["n"]["seeds"], by_method["n"]["missing"]) == ("2", "")


@pytest.mark.parametrize("garbage", ['{"kind": "final", "h_sc', "[1, 2]", "\x00\x01"])
def test_a_damaged_results_file_is_named_with_its_line(tmp_path, capsys, garbage):
    from seeclip.cli import main

    run = tmp_path / "runs" / "digits_full_printed_zeroshot" / "abc"
    run.mkdir(parents=True)
    (run / "done").write_text("")
    (run / "results.jsonl").write_text('{"kind": "epoch", "epoch": 1}\n' + garbage + "\n")
    assert main(["report", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'results.jsonl'}, line 2: not a JSON record" in err
    assert err.count("\n") == 1 and (run / "results.jsonl").exists()  # nothing deleted


def test_report_out_is_swapped_in_whole_and_never_replaces_a_foreign_folder(tmp_path):
    records = [_hashed("m", "t1", 0, 0.2), _hashed("m", "t2", 0, 0.6)]
    out = tmp_path / "report"
    write_report(records, out, runs_dir=tmp_path, plots=False)
    (out / "figures").mkdir()
    (out / "figures" / "roc_old_run.png").write_bytes(b"stale")  # of a run no longer reported
    write_report(records, out, runs_dir=tmp_path, plots=False, formats=("csv",))
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "index.md", "tables.csv"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by seeclip"):
        write_report(records, mine, runs_dir=tmp_path, plots=False)
    assert (mine / "thesis.tex").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_report(records, empty, runs_dir=tmp_path, plots=False) == empty / "index.html"
