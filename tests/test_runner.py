"""The runner's plumbing: feature memo, data hashes, pseudo-unknown sources, run records."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from seeclip import run_data, runner, wiring
from seeclip.backbone import build_backbone
from seeclip.config import apply_overrides
from seeclip.records import read_records
from seeclip.run_config import RunConfig


def test_feature_memo_is_keyed_by_the_weights_not_the_object(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(run_data, "encode_cached", lambda backbone, *a, **k: calls.append(backbone))
    manifest = SimpleNamespace(root=tmp_path, samples=(SimpleNamespace(path="a.png"),))
    memo = run_data.FeatureMemo()
    a, same, other = (build_backbone("tiny-vit", seed=s) for s in (0, 0, 1))
    kw = {"cache_dir": tmp_path, "name": "x", "batch_size": 4, "progress": False}
    memo.get(a, manifest, **kw)
    memo.get(same, manifest, **kw)  # another object with the same weights: served from memo
    memo.get(other, manifest, **kw)  # same name, other weights: never the old features
    assert calls == [a, other]


def _cfg(**over):
    items = [
        "data.target=printed",
        "backbone.name=tiny-vit",
        "method=seeclip",
        "train.epochs=2",
        "train.batch_size=6",
    ]
    return apply_overrides(RunConfig(), items + [f"{k}={v}" for k, v in over.items()])


def test_validation_pseudo_unknowns_come_from_source_val_images_only(small_digits, monkeypatch):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    cfg = _cfg()
    run = run_data.load_run_data(cfg, progress=False)
    sources = wiring.pseudo_sources(cfg, run, progress=False)
    train, val = sources.train(), sources.val()
    val_feats = run.features(run.data.source_val)
    torch.testing.assert_close(val.features.global_, val_feats.global_)
    assert set(run.data.source_val).isdisjoint(run.data.source_train)
    assert len(train.features) == len(run.data.source_train)
    assert run.data_hash_kind == "content" and len(run.data_hash) == 64


def test_records_one_final_and_one_per_epoch_and_eval_replaces(small_digits, tmp_path, monkeypatch):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    cfg = _cfg(**{"train.selection": "val_h"})
    result = runner.run_eval(cfg, runs_dir=tmp_path, progress=False)
    records = read_records(result.run_dir)
    assert [r["kind"] for r in records] == ["epoch", "epoch", "final"]
    final = records[-1]
    assert final["selection"] == "val_h"
    chosen = [r["epoch"] for r in records[:2] if r["selected"]]
    assert chosen == [final["selected_epoch"]]
    scores = [r["val_h_score"] for r in records[:2]]
    assert final["selected_epoch"] == int(np.argmax(scores)) + 1
    assert final["setting_hash"] == cfg.setting_hash() and final["config_hash"] == cfg.hash()
    again = runner.eval_run(result.run_dir, progress=False)
    after = read_records(result.run_dir)
    assert [r["kind"] for r in after] == ["epoch", "epoch", "final"]  # replaced, not appended
    assert after[:2] == records[:2] and again.record["selected_epoch"] == final["selected_epoch"]
    assert again.record["h_score"] == final["h_score"]
    # the folder reads back as one run with its final record
    reused = runner.run_eval(cfg, runs_dir=tmp_path, progress=False)
    assert reused.cached and json.dumps(reused.record) == json.dumps(after[-1])


def test_real_datasets_are_named_by_a_listing_hash(tmp_path):
    from PIL import Image

    for i, path in enumerate(["d1/c1/a.png", "d1/c2/b.png"]):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / path)
    samples = tuple(
        SimpleNamespace(path=p, class_name=p.split("/")[1], domain="d1", split="all")
        for p in ["d1/c1/a.png", "d1/c2/b.png"]
    )
    manifest = SimpleNamespace(root=tmp_path, samples=samples)
    digest, kind = run_data.data_hash(manifest)
    assert kind == "listing" and len(digest) == 64
    Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(tmp_path / "d1/c2/b.png")
    assert run_data.data_hash(manifest)[0] != digest  # a file of another size changes the hash


def test_backbone_memo_keeps_the_newest_and_rebuilds_after_eviction(monkeypatch):
    built = []
    monkeypatch.setattr(run_data, "build_backbone", lambda name, **kw: built.append(name) or name)
    memo = run_data.BackboneMemo(size=2)
    for name in ("a", "b", "a", "c", "a", "b"):
        memo.get(name, None)
    assert built == ["a", "b", "c", "b"]  # "b" was the least recently used when "c" came
