"""Kill-point harness: SIGKILL a seeclip command at random moments, rerun it, and check that the
outcome equals an uninterrupted run's and that no partial file is left behind.

    python scripts/kill_points.py --out /tmp/kill [--points 20] [--stages prepare encode train
        generate sweep report] [--seed 0]

Each stage is one command on the embedded digits world (small draws, tiny-vit, one thread):

- prepare: ``seeclip prepare digits``; compared: the data tree's bytes and the manifest;
- encode: ``seeclip eval --method zeroshot`` on an empty feature cache; the cache, the run;
- train: ``seeclip eval --method seeclip`` (3 epochs, checkpoint every epoch); weights,
  predictions and the final record (timing fields left out);
- generate: ``seeclip generate --backend feature``; the pool's files;
- sweep: ``seeclip sweep --methods zeroshot coop`` (2 processes); every run, as for train;
- report: ``seeclip report``; the report's text files (tables, index.md).

For each stage the uninterrupted command runs once in its own ``SEECLIP_HOME`` and is timed;
then, ``--points`` times, a fresh home is set up to the same starting point, the command is
started and killed (SIGKILL to its process group) at a time drawn uniformly from the reference
run's duration, and the same command is run again to the end. A point survives when the rerun
exits 0, its outputs hash like the reference's, and no temporary sibling of an atomic write (a
hidden file) remains. Records go to ``--out/kill_points.json``; the summary line reads
``kill_points survived=<n>/<total>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEECLIP = [sys.executable, "-m", "seeclip.cli"]
EVAL = [
    "eval",
    "--benchmark",
    "digits",
    "--backbone",
    "tiny-vit",
    "--target",
    "printed",
    "--no-progress",
    "--threads",
    "1",
]
SMALL = ["--n-per-class", "6"]
TRAIN = ["train.epochs=3", "train.batch_size=8"]
TIMING_KEYS = ("fit_seconds", "seconds", "created", "started", "finished", "time")


@dataclass(frozen=True)
class Stage:
    name: str
    setup: Callable[[Path], None]  # brings a fresh home to the stage's starting point
    command: Callable[[Path], list[str]]  # the command, given the home
    outputs: Callable[[Path], dict[str, str]]  # what must match: name -> hash


def _run(argv: list[str], home: Path, *, kill_after: float | None = None) -> int | None:
    """Run ``seeclip argv`` with ``home``; with ``kill_after`` SIGKILL its process group then
    (None returned if it was killed before it finished)."""
    env = {**os.environ, "SEECLIP_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*SEECLIP, *argv],
        env=env,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    if kill_after is None:
        _, err = proc.communicate()
        if proc.returncode:
            print(err.decode()[-2000:], file=sys.stderr)
        return proc.returncode
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode  # finished before the kill point
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _hash_files(root: Path, pattern: str, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for path in sorted(root.glob(pattern)):
        if path.is_file() and not any(s in path.name for s in skip):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _untimed_records(root: Path) -> dict[str, str]:
    """The final records of every run under ``root``, timing fields left out."""
    out = {}
    for path in sorted(root.glob("runs/*/*/results.jsonl")):
        records = [json.loads(x) for x in path.read_text().splitlines()]
        final = [
            {k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in records
            if r.get("kind") == "final"
        ]
        out[str(path.relative_to(root))] = hashlib.sha256(
            json.dumps(final, sort_keys=True, default=str).encode()
        ).hexdigest()
    return out


def _run_outputs(home: Path) -> dict[str, str]:
    out = _hash_files(home, "runs/*/*/predictions.npz")
    out |= _hash_files(home, "runs/*/*/model.safetensors")
    out |= {str(p.relative_to(home)): "done" for p in home.glob("runs/*/*/done")}  # a timestamp
    return out | _untimed_records(home)


def _manifests(home: Path) -> dict[str, str]:
    """The manifest rows and their sidecar, named and read without the home's own path."""
    out = {}
    for csv_path in sorted(home.glob("manifests/*.csv")):
        out[f"manifest {csv_path.stem.split('-')[0]}"] = hashlib.sha256(
            csv_path.read_bytes()
        ).hexdigest()
        meta = json.loads(csv_path.with_suffix(".json").read_text())
        meta.pop("root", None)
        out[f"sidecar {csv_path.stem.split('-')[0]}"] = hashlib.sha256(
            json.dumps(meta, sort_keys=True).encode()
        ).hexdigest()
    return out


def _untimed(value):
    """A JSON value without its timing fields (``*seconds``, ``created``...), recursively."""
    if isinstance(value, dict):
        return {
            k: _untimed(v)
            for k, v in value.items()
            if not k.endswith("seconds") and k not in TIMING_KEYS
        }
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _pool_files(home: Path) -> dict[str, str]:
    """A pool's arrays by bytes, its JSON records without their timings."""
    out = _hash_files(home, "pools/**/*", skip=(".json",))
    for path in sorted(home.glob("pools/**/*.json")):
        record = _untimed(json.loads(path.read_text()))
        out[str(path.relative_to(home))] = hashlib.sha256(
            json.dumps(record, sort_keys=True).encode()
        ).hexdigest()
    return out


def _cache_arrays(home: Path) -> dict[str, str]:
    """The feature cache's arrays, named without the data root's tag (it differs per home)."""
    out = {}
    for name, digest in _hash_files(home, "features/**/*.npy").items():
        parts = Path(name).parts
        out[str(Path(parts[0], parts[1].split("-")[0], *parts[2:]))] = digest
    return out


def _prepared(home: Path) -> None:
    assert _run(["prepare", "digits", *SMALL, "--no-progress"], home) == 0


def _trained(home: Path) -> None:
    _prepared(home)
    for method in ("zeroshot", "coop"):
        argv = [*EVAL, "--method", method, "--runs-dir", "runs", *TRAIN]
        assert _run(argv, home) == 0


STAGES = {
    "prepare": Stage(
        "prepare",
        lambda home: None,
        lambda home: ["prepare", "digits", *SMALL, "--no-progress"],
        lambda home: _hash_files(home, "data/**/*") | _manifests(home),
    ),
    "encode": Stage(
        "encode",
        _prepared,
        lambda home: [*EVAL, "--method", "zeroshot", "--runs-dir", "runs"],
        lambda home: _cache_arrays(home) | _run_outputs(home),
    ),
    "train": Stage(
        "train",
        _prepared,
        lambda home: [*EVAL, "--method", "seeclip", "--runs-dir", "runs", *TRAIN],
        _run_outputs,
    ),
    "generate": Stage(
        "generate",
        _prepared,
        lambda home: [
            "generate",
            "--config",
            "digits",
            "--target",
            "printed",
            "--backend",
            "feature",
            "--n",
            "8",
            "--no-progress",
            "backbone.name=tiny-vit",
            "diffusion.train_steps=40",
            "diffusion.width=64",
            "diffusion.depth=1",
            "diffusion.sample_steps=4",
        ],
        _pool_files,
    ),
    "sweep": Stage(
        "sweep",
        _prepared,
        lambda home: [
            "sweep",
            "--config",
            "digits",
            "--methods",
            "zeroshot",
            "coop",
            "--targets",
            "printed",
            "outline",
            "--runs-dir",
            "runs",
            "--jobs",
            "2",
            "--no-progress",
            "backbone.name=tiny-vit",
            *TRAIN,
        ],
        _run_outputs,
    ),
    "report": Stage(
        "report",
        _trained,
        lambda home: ["report", "runs", "--out", "report"],
        lambda home: _hash_files(home, "report/**/*", skip=(".png", ".html")),
    ),
}


def _leftovers(home: Path) -> list[str]:
    """Hidden files and folders: the temporary siblings that atomic writes rename into place
    (``.<name>.<random><suffix>``, ``.<folder>.tmp-*``) and a kill can strand."""
    return [str(p.relative_to(home)) for p in home.rglob(".*")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--points", type=int, default=20, help="kill points per stage (default 20)")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.stages:
        stage = STAGES[name]
        ref = out / name / "reference"
        shutil.rmtree(ref, ignore_errors=True)
        ref.mkdir(parents=True)
        stage.setup(ref)
        t0 = time.perf_counter()
        assert _run(stage.command(ref), ref) == 0, f"{name}: the uninterrupted run failed"
        duration = time.perf_counter() - t0
        expected = stage.outputs(ref)
        assert expected, f"{name}: the reference produced nothing to compare"
        points = []
        for i in range(args.points):
            home = out / name / f"point{i:02d}"
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(parents=True)
            stage.setup(home)
            at = rng.uniform(0.05, 1.0) * duration
            killed = _run(stage.command(home), home, kill_after=at) is None
            code = _run(stage.command(home), home)
            got = stage.outputs(home)
            left = _leftovers(home)
            diff = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
            ok = code == 0 and not diff and not left
            points.append(
                {
                    "at_s": round(at, 2),
                    "killed": killed,
                    "rerun_exit": code,
                    "ok": ok,
                    "differs": diff[:5],
                    "leftovers": left[:5],
                }
            )
            print(
                f"{name:9s} point {i:2d} kill at {at:6.2f}s killed={killed!s:5s} "
                f"rerun={code} {'ok' if ok else 'FAILED'} {diff[:2]} {left[:2]}"
            )
            shutil.rmtree(home, ignore_errors=True)
        results[name] = {"reference_seconds": round(duration, 1), "points": points}
    survived = sum(p["ok"] for r in results.values() for p in r["points"])
    total = sum(len(r["points"]) for r in results.values())
    (out / "kill_points.json").write_text(json.dumps(results, indent=1))
    print(f"kill_points survived={survived}/{total}")


if __name__ == "__main__":
    main()
