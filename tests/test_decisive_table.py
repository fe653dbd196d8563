"""scripts/decisive_table.py: which rows get more seeds (issue 10: 5 seeds where the H std over 3
seeds exceeds 2 points), read from the records' target H only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from seeclip.sweep import SweepSpec, Variant

SCRIPT = Path(__file__).parents[1] / "scripts" / "decisive_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("decisive_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(method, protocol, h_by_seed, targets=("a", "b")):
    return [{"method": method, "protocol": protocol, "seed": s, "target": t, "h_score": h}
            for s, h in enumerate(h_by_seed) for t in targets]  # fmt: skip


def test_rows_whose_h_std_exceeds_the_limit_get_more_seeds_per_protocol():
    noisy_rows = _script().noisy_rows
    spec = SweepSpec(config="c.yaml", variants=(Variant("steady", ()), Variant("noisy", ())),
                     protocols=("full", "daml"), seeds=(0, 1, 2))  # fmt: skip
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
