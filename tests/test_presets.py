"""Every shipped preset parses into the typed config and names registered things."""

from pathlib import Path

import pytest

from seeclip.datasets import BENCHMARKS, get_benchmark
from seeclip.methods.registry import METHODS
from seeclip.pseudo import PSEUDO_UNKNOWNS
from seeclip.run_config import load_config

PRESETS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_presets_exist_for_every_real_benchmark():
    names = {p.stem for p in PRESETS}
    assert {"pacs", "vlcs", "office_home", "mini_domainnet", "multi_dataset"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid(path):
    cfg = load_config(path)
    assert cfg.data.benchmark in BENCHMARKS
    assert cfg.method in METHODS
    assert cfg.train.pseudo_unknowns in PSEUDO_UNKNOWNS
    spec = get_benchmark(cfg.data.benchmark)
    assert cfg.data.protocol in spec.protocols
    assert cfg.train.batch_size >= len(spec.sources_for(spec.targets[0]))
