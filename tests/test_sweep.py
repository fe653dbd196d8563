"""seeclip sweep: variant parsing, the plan, resume, locks, and the CLI end to end."""

import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seeclip.cli import main
from seeclip.config import ConfigError
from seeclip.sweep import (
    SweepSpec,
    Variant,
    execute,
    load_sweep,
    parse_variant,
    plan,
    run_lock,
    run_sweep,
)

PRESET = (
    "data: {benchmark: digits, protocol: full}\n"
    "backbone: {name: tiny-vit}\n"
    "method: zeroshot\n"
    "train: {epochs: 1, batch_size: 8}\n"
)


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text(PRESET)
    return path


def test_parse_variant_labels():
    assert parse_variant("coop") == Variant("coop", ("method=coop",))
    v = parse_variant("seeclip:train.pseudo_unknowns=none,loss.alpha=0")
    assert v.label == "seeclip[pseudo_unknowns=none,alpha=0]"
    assert v.overrides == ("method=seeclip", "train.pseudo_unknowns=none", "loss.alpha=0")
    named = parse_variant("seeclip:label=no_pseudo,train.pseudo_unknowns=none")
    assert named == Variant("no_pseudo", ("method=seeclip", "train.pseudo_unknowns=none"))
    with pytest.raises(ConfigError, match="METHOD"):
        parse_variant("method=coop")
    with pytest.raises(ConfigError, match="'epochs' is not key=value"):
        parse_variant("coop:epochs")


def test_plan_is_seed_major_with_labels_and_checks_names(preset):
    spec = SweepSpec(
        str(preset),
        (parse_variant("zeroshot"), parse_variant("coop:label=c")),
        protocols=("full", "daml"),
        seeds=(0, 1),
    )
    runs = plan(spec)
    assert len(runs) == 2 * 2 * 2 * 4  # variants x protocols x seeds x targets
    assert [r.seed for r in runs[:16]] == [0] * 16  # every run of seed 0 first
    assert {(r.method, r.label) for r in runs} == {("zeroshot", None), ("coop", "c")}
    assert {r.data.target for r in runs} == {"handwritten", "printed", "textured", "outline"}
    with pytest.raises(ConfigError, match="no protocol 'odd'"):
        plan(dataclasses.replace(spec, protocols=("odd",)))
    with pytest.raises(ConfigError, match="no target domain 'sketch'"):
        plan(dataclasses.replace(spec, targets=("sketch",)))
    with pytest.raises(ConfigError, match="given twice"):
        SweepSpec(str(preset), (Variant("a", ()), Variant("a", ("method=coop",))))


def test_sweep_file(tmp_path, preset):
    f = tmp_path / "s.yaml"
    f.write_text(
        f"config: {preset}\nseeds: [3]\ntargets: [printed]\n"
        "variants:\n  zs: [method=zeroshot]\n  coop: [method=coop]\n"
    )
    spec = load_sweep(f)
    assert spec.seeds == (3,) and spec.targets == ("printed",) and spec.protocols == ("full",)
    assert [v.label for v in spec.variants] == ["zs", "coop"]
    with pytest.raises(ConfigError, match="unknown method 'no_such'"):
        plan(dataclasses.replace(spec, variants=(Variant("x", ("method=no_such",)),)))
    from seeclip.cli import build_parser
    from seeclip.cli.sweep import spec_from_args

    # --methods with --sweep: a label of the file selects that variant, anything else is
    # METHOD[:key=value]
    args = build_parser().parse_args(
        ["sweep", "--sweep", str(f), "--methods", "zs", "coop:label=c2,train.epochs=2"]
    )
    chosen = spec_from_args(args).variants
    assert chosen == (
        Variant("zs", ("method=zeroshot",)),
        Variant("c2", ("method=coop", "train.epochs=2")),
    )
    f.write_text("config: x.yaml\nvariants: {a: [method=coop]}\nepochs: 3\n")
    with pytest.raises(ConfigError, match="nothing else"):
        load_sweep(f)
    f.write_text("variants: {a: method=coop}\n")
    with pytest.raises(ConfigError, match="name the preset"):
        load_sweep(f)


def _hold_lock(run_dir, ready, release):
    with run_lock(run_dir, wait=False) as locked:
        assert locked
        ready.set()
        release.wait(30)


def test_a_run_locked_by_another_process_is_not_computed_twice(
    small_digits, tmp_path, monkeypatch, preset
):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    (cfg,) = [
        c for c in plan(SweepSpec(str(preset), (parse_variant("zeroshot"),), targets=("printed",)))
    ]
    runs = str(tmp_path / "runs")
    run_dir = cfg.run_dir(runs)
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(run_dir, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        assert execute(cfg, runs, None).status == "busy"
        assert not (run_dir / "done").exists()
    finally:
        release.set()
        holder.join(60)
    assert execute(cfg, runs, None, wait=True).status == "ran"
    assert (run_dir / "done").exists()


def test_sweep_runs_once_resumes_and_reports(small_digits, tmp_path, monkeypatch, preset, capsys):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    runs = tmp_path / "runs"
    argv = [
        "sweep",
        "--config",
        str(preset),
        "--methods",
        "zeroshot",
        "coop:label=coop1",
        "--targets",
        "printed",
        "outline",
        "--seeds",
        "0",
        "1",
        "--runs-dir",
        str(runs),
        "--no-progress",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "8 runs: 0 finished earlier, 8 to run" in out and "(8 computed now)" in out
    assert "| digits | full | coop1 | **mean** | 2 |" in out
    done = sorted(runs.glob("*/*/done"))
    assert len(done) == 8
    stamps = {p: p.read_text() for p in done}
    # an unfinished run (no `done`) is redone; finished ones are left alone
    victim = done[0]
    victim.unlink()
    assert main(argv) == 0
    assert "1 to run" in capsys.readouterr().out
    assert victim.exists() and all(p.read_text() == stamps[p] for p in done if p != victim)
    assert main(argv) == 0  # a second invocation does nothing
    out = capsys.readouterr().out
    assert "all 8 runs finished earlier" in out and "(0 computed now)" in out


def test_a_failing_run_is_reported_and_the_others_finish(
    small_digits, tmp_path, monkeypatch, preset
):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    cfgs = plan(
        SweepSpec(str(preset), (parse_variant("zeroshot"),), targets=("printed",), seeds=(0, 1))
    )
    arch = dataclasses.replace(cfgs[0].backbone, name="no-such-arch")
    bad = dataclasses.replace(cfgs[0], backbone=arch)
    result = run_sweep([bad, cfgs[1]], runs_dir=str(tmp_path), progress=False, log=lambda s: None)
    assert [o.status for o in result.outcomes] == ["failed", "ran"]
    assert "no-such-arch" in result.failed[0].error
    record = json.loads((cfgs[1].run_dir(tmp_path) / "results.jsonl").read_text())
    assert record["seed"] == 1


def _workers_of(parent: int) -> list[int]:
    """Live multiprocessing workers whose parent is ``parent`` (Linux /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] not in "ZX" and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_sigterm_to_a_parallel_sweep_stops_its_workers():
    # `kill`, `timeout` or a scheduler stop only the parent; its spawned workers used to be left
    # behind, finishing their task and then waiting for work forever
    code = (
        "import time\nfrom seeclip.sweep import run_parallel\n"
        "run_parallel(time.sleep, [(60,)] * 4, jobs=2, on_result=print)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers := _workers_of(parent.pid)) < 2:
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], "workers outlived the stopped sweep"
    finally:
        parent.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
