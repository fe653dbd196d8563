"""seeclip report --out: paper-layout tables in md/csv/tex, figures, index.md, index.html (rendered
in headless Chromium), and the labelled oracle H."""

import csv
import io
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from seeclip.cli import main
from seeclip.metrics import h_score, oracle_h_score
from seeclip.records import run_dir_of
from seeclip.report import METRICS, paper_tables, read_records
from seeclip.report_files import write_report

PRESET = (
    "data: {benchmark: digits, protocol: full}\n"
    "backbone: {name: tiny-vit}\n"
    "method: zeroshot\n"
    "train: {epochs: 1, batch_size: 8}\n"
)


def rec(method, target, seed, h):
    return {
        "benchmark": "b",
        "protocol": "full",
        "method": method,
        "target": target,
        "seed": seed,
        "h_score": h,
        "acc_known": 0.5,
    }


def test_paper_table_cells_and_mean_column():
    records = [
        rec("m", "t1", 0, 0.2),
        rec("m", "t1", 1, 0.4),
        rec("m", "t2", 0, 0.6),
        rec("m", "t2", 1, 0.8),
        rec("n", "t1", 0, 0.5),
    ]
    (table,) = paper_tables(records, ["h_score"])
    assert table.header == ("method", "t1", "t2", "mean")
    rows = {r[0]: r[1:] for r in table.rows()}
    assert rows["m"] == ("30.0 ± 10.0", "70.0 ± 10.0", "50.0 ± 10.0")
    # n has no run on t2: no mean over targets rather than a mean of what is there
    assert rows["n"] == ("50.0", "n/a", "incomplete †")
    assert table.notes() == ["† n: mean over the seeds with every target only; missing t2 seed 0"]


def test_oracle_h_is_the_best_threshold_by_brute_force():
    rng = np.random.default_rng(0)
    y = rng.integers(-1, 4, 400)
    closed = np.where(rng.random(400) < 0.8, np.maximum(y, 0), rng.integers(0, 4, 400))
    score = np.round(rng.normal(size=400) + (y < 0), 1)  # ties on purpose
    best = max(
        h_score(y, np.where(score > t, 4, closed), num_known=4)
        for t in [np.inf, -np.inf, *np.unique(score)]
    )
    assert oracle_h_score(y, closed, score) == pytest.approx(best)
    assert np.isnan(oracle_h_score([0, 1], [0, 1], [0.1, 0.2]))  # no unknowns


@pytest.fixture(scope="module")
def runs(small_digits, tmp_path_factory):
    """zeroshot and seeclip (mixup pseudo-unknowns), two targets, two seeds."""
    tmp = tmp_path_factory.mktemp("report_runs")
    (tmp / "preset.yaml").write_text(PRESET)
    mp = pytest.MonkeyPatch()
    mp.setenv("SEECLIP_HOME", str(small_digits))
    argv = [
        "sweep",
        "--config",
        str(tmp / "preset.yaml"),
        "--methods",
        "zeroshot",
        "seeclip",
        "--targets",
        "printed",
        "outline",
        "--seeds",
        "0",
        "1",
        "--runs-dir",
        str(tmp / "runs"),
        "--no-progress",
    ]
    assert main(argv) == 0
    mp.undo()
    return tmp / "runs"


def test_pseudo_unknown_scores_are_saved_for_runs_that_drew_them(runs):
    records = read_records(runs)
    for r in records:
        with np.load(run_dir_of(runs, r) / "predictions.npz") as z:
            if r["method"] == "seeclip":  # mixup, 3 source domains x 200
                assert z["pseudo_unknown_score"].shape == (600,)
                assert np.all((z["pseudo_unknown_score"] >= 0) & (z["pseudo_unknown_score"] <= 1))
            else:
                assert "pseudo_unknown_score" not in z.files


def test_report_folder(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out), "--oracle"]) == 0
    printed = capsys.readouterr().out
    assert "ORACLE" in printed and "H ORACLE" in printed
    records = read_records(runs)
    # csv: tidy numbers that recompute from the records
    rows = list(csv.DictReader(io.StringIO((out / "tables.csv").read_text())))
    zs_h = [
        r
        for r in rows
        if (r["method"], r["metric"], r["target"]) == ("zeroshot", "h_score", "printed")
    ]
    expected = [
        r["h_score"] for r in records if (r["method"], r["target"]) == ("zeroshot", "printed")
    ]
    assert len(zs_h) == 1 and float(zs_h[0]["mean"]) == pytest.approx(np.mean(expected), abs=1e-6)
    assert int(zs_h[0]["seeds"]) == 2
    assert {r["metric"] for r in rows} >= {*METRICS, "h_score_oracle"}
    tex = (out / "tables.tex").read_text()
    assert r"\toprule" in tex and r"$\pm$" in tex and "seeclip" in tex
    md = (out / "index.md").read_text()
    (fp,) = {r["backbone_fingerprint"] for r in records}  # every run on the same weights
    assert f"weights {records[0]['backbone']} {fp[:12]} (sha256)" in md
    figures = sorted((out / "figures").glob("*.png"))
    kinds = {p.name.split("_")[0] for p in figures}
    assert kinds == {"roc", "scores", "h", "confusion"}  # the four kinds of plot
    assert len([p for p in figures if p.name.startswith("roc_")]) == 2  # one per target
    for p in figures:
        assert f"figures/{p.name}" in md
        assert Image.open(p).size[0] > 200
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures)
    assert "<table>" in html and "figures/" not in html  # self-contained


def test_report_rejects_unknown_format(runs, tmp_path):
    with pytest.raises(ValueError, match="unknown report format 'pdf'"):
        write_report(read_records(runs), tmp_path, runs_dir=runs, formats=("pdf",))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_index_html_renders_in_headless_chromium(runs, tmp_path):
    index = write_report(read_records(runs), tmp_path / "r", runs_dir=runs, formats=("md",))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", index.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count("<img") == len(list((tmp_path / "r" / "figures").glob("*.png")))
    assert "<h3>H</h3>" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,3000", index.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("L"))
    # tables and plots drawn: a good share of the page is not background white
    assert (pixels < 200).mean() > 0.01
    # the lower half holds figures (coloured curves, bars, histograms), not an empty page
    assert (pixels[1500:] < 200).mean() > 0.005
