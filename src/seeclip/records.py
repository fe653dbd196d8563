"""Run records (``results.jsonl``): what a run folder says about itself, one JSON per line.

A run folder holds one record of ``kind="final"`` (the evaluation on the target, with the
model-selection rule and epoch it used) and one ``kind="epoch"`` record per training epoch
(loss terms, source-validation criteria). Re-evaluating a run *replaces* its final record, so
a folder is always one (config, seed) and a report counts runs, not evaluations.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from seeclip.io import write_text

RESULTS = "results.jsonl"
FINAL = "final"
EPOCH = "epoch"
KINDS = (FINAL, EPOCH)


def run_name(benchmark: str, protocol: str, target: str | None, label: str) -> str:
    """The name of a run's parent folder: ``<benchmark>_<protocol>_<target>_<label>``."""
    return f"{benchmark}_{protocol}_{target}_{label}"


def run_folder(runs_dir: str | Path, name: str, config_hash: str) -> Path:
    """Where a run lives: ``<runs_dir>/<run name>/<config hash>`` (the one place that says so)."""
    return Path(runs_dir) / name / config_hash


def run_dir_of(runs_dir: str | Path, record: dict) -> Path:
    """The folder a final record was written to."""
    name = run_name(record["benchmark"], record["protocol"], record["target"], record["method"])
    return run_folder(runs_dir, name, record["config_hash"])


def read_records(run_dir: str | Path) -> list[dict]:
    """Every record of one run folder, in file order ([] when it has none)."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            record = err
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}, line {number}: not a JSON record; delete that run folder (or rerun it "
                f"with --force) and the reports and sweeps read the others again"
            )
        records.append(record)
    return records


def final_record(run_dir: str | Path) -> dict | None:
    """The run's final record (the last one, should an old folder hold several)."""
    finals = [r for r in read_records(run_dir) if r.get("kind", FINAL) == FINAL]
    return finals[-1] if finals else None


def write_records(run_dir: str | Path, final: dict, epochs: Iterable[dict] | None = None) -> None:
    """Write the run's records atomically: ``epochs`` (kept from before when None), then final.

    Concurrent writers of one folder each write a whole file; the last one wins, and the folder
    still holds exactly one final record.
    """
    if final.get("kind") != FINAL:
        raise ValueError(f"the final record must have kind={FINAL!r}")
    if epochs is None:
        epochs = [r for r in read_records(run_dir) if r.get("kind") == EPOCH]
    lines = [json.dumps(r) for r in epochs] + [json.dumps(final)]
    write_text(Path(run_dir) / RESULTS, "\n".join(lines) + "\n")


__all__ = [
    "EPOCH",
    "FINAL",
    "KINDS",
    "RESULTS",
    "final_record",
    "read_records",
    "run_dir_of",
    "run_folder",
    "run_name",
    "write_records",
]
