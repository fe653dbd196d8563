"""scripts/rehearsal.py: benchmark trees cut from photos that pip packages ship (real domain and
class folder names, awkward files) that ``seeclip prepare`` accepts, and, slow, the reduced
dress rehearsal of prepare -> sweep -> report -> predict through the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from seeclip.cli import main
from seeclip.datasets import get_benchmark
from seeclip.datasets.images import IMAGE_EXTENSIONS


def _folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


@pytest.mark.parametrize(
    ("benchmark", "per_class"), [("pacs", 2), ("office_home", 2), ("mini_domainnet", 3)]
)
def test_tree_has_the_spec_folders_awkward_files_and_prepare_accepts_it(
    load_script, tmp_path, benchmark, per_class
):
    rehearsal = load_script("rehearsal")
    spec = get_benchmark(benchmark)
    summary = rehearsal.build_tree(benchmark, tmp_path, per_class=per_class, max_side=48)
    base = tmp_path / spec.dirnames[0]
    assert Path(summary["base"]) == base and not summary["reused"]

    # every domain and class folder of the spec, by its exact name, each with its images
    assert _folders(base) == sorted(spec.domains) + (
        ["splits_mini"] if benchmark == "mini_domainnet" else []
    )
    for domain in spec.domains:
        assert _folders(base / domain) == sorted(spec.classes)
        for cls in spec.classes:
            files = [f for f in (base / domain / cls).iterdir() if f.is_file()]
            assert len(files) == per_class
            assert all(f.suffix.lower() in IMAGE_EXTENSIONS for f in files)
    n = len(spec.domains) * len(spec.classes) * per_class
    assert summary["images"] == n

    # the files real downloads bring: EXIF-rotated JPEGs, greyscale, PNG, spaces and unicode
    files = sorted(base.rglob("*.*"))
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    rotated = [f for f in images if f.suffix == ".jpg" and " " in f.name]
    orientations = set()
    for f in rotated:
        with Image.open(f) as img:
            orientations.add(img.getexif().get(0x0112))
    assert rotated and orientations <= {3, 6, 8} and orientations
    greys = []
    for f in images[:60]:
        with Image.open(f) as img:
            greys.append(img.mode == "L")
    assert any(greys) and not all(greys)
    assert any(f.suffix == ".png" for f in images)
    assert any(not f.name.isascii() for f in images)
    assert any(" " in f.name for f in images)
    sizes = set()
    for f in images[:40]:
        with Image.open(f) as img:
            sizes.add(img.size)
    assert len(sizes) > 10  # sizes and aspect ratios vary

    if benchmark == "mini_domainnet":  # the split files list every image, by class index
        lines = []
        for domain in spec.domains:
            for split in ("train", "test"):
                lines += (base / "splits_mini" / f"{domain}_{split}.txt").read_text().splitlines()
        assert len(lines) == n
        for line in lines[:: max(1, n // 50)]:
            rel, label = line.rsplit(maxsplit=1)
            assert (base / rel).is_file()
            assert spec.classes[int(label)] == Path(rel).parent.name

    # seeclip prepare takes the tree as it is
    assert main(["prepare", benchmark, "--data-root", str(tmp_path), "--no-progress"]) == 0
    # a second build with the same settings keeps the files (their mtimes key the cache)
    assert rehearsal.build_tree(benchmark, tmp_path, per_class=per_class, max_side=48)["reused"]


def test_too_few_images_per_class_is_refused_with_the_fix(load_script, tmp_path):
    rehearsal = load_script("rehearsal")
    with pytest.raises(rehearsal.RehearsalError, match="--per-class 3"):
        rehearsal.build_tree("mini_domainnet", tmp_path, per_class=2)


def test_photos_come_from_installed_packages(load_script):
    photos = load_script("rehearsal").photo_files()
    assert len(photos) >= 3
    assert all("site-packages" in str(p) or "dist-packages" in str(p) for p in photos)


@pytest.mark.slow
@pytest.mark.rehearsal
def test_reduced_rehearsal_runs_every_stage_through_the_cli(load_script, tmp_path):
    rehearsal = load_script("rehearsal")
    out = tmp_path / "rehearsal"
    assert rehearsal.main(["--out", str(out), "--reduced", "--threads", "2"]) == 0
    record = json.loads((out / "rehearsal.json").read_text())

    stages = [(r["tree"], r["stage"]) for r in record["stages"]]
    assert stages == [
        ("setup", "write_weights"),
        ("setup", "check_weights"),
        ("setup", "write_sd"),
        ("setup", "check_sd"),
        ("pacs", "build_tree"),
        ("pacs", "prepare"),
        ("pacs", "sweep"),
        ("pacs", "report"),
        ("pacs", "predict"),
    ]
    assert all(r["rc"] == 0 and r["seconds"] > 0 and r["peak_mib"] > 0 for r in record["stages"])
    assert record["machine"]["cpu_count"] >= 1 and record["machine"]["torch"]

    # the weight formats: safetensors and .bin load as written; TorchScript is refused in one
    # line whose conversion command works
    formats = record["checks"]["weights"]["formats"]
    assert formats["safetensors"]["identical"] and formats["bin"]["identical"]
    script = formats["torchscript"]
    assert script["behaviour"] == "refused" and script["one_line"]
    assert script["conversion_rc"] == 0 and script["converted_identical"]
    sd = record["checks"]["sd_folder"]
    assert sd["classes"]["unet"] == "UNet2DConditionModel" and sd["vocab"] == 49408

    pacs = record["checks"]["pacs"]
    known = list(get_benchmark("pacs").protocols["full"].known)
    assert pacs["runs"] == 3 and pacs["missing"] == [] and pacs["classes_named"]
    assert pacs["seeclip_runs_with_sd_pseudo_unknowns"] == 1
    # the paper's generator ran online in training (the presets' sd_online): no pool on disk
    assert pacs["seeclip_online_images_drawn"][0] >= 1 and pacs["sd_pools"]["images"] == 0
    assert pacs["exif_orientation"]["applied"]  # camera photos are read upright
    finals = [
        json.loads(line)
        for f in (out / "runs" / "pacs").glob("*/*/results.jsonl")
        for line in f.read_text().splitlines()
        if '"final"' in line
    ]
    assert {r["method"] for r in finals} == {"zeroshot", "coop", "seeclip"}
    assert all(r["classes"]["known"] == known for r in finals)
    assert all(r["config"]["backbone"]["pretrained"].endswith(".safetensors") for r in finals)

    report = out / "reports" / "pacs"
    for name in ("index.html", "index.md", "tables.md", "tables.csv", "tables.tex"):
        assert (report / name).is_file()

    # predict: one row per unlabelled image, no error, a known class or "unknown"
    images = sorted(p for p in (out / "predict_images" / "pacs").iterdir() if p.is_file())
    rows = list(csv.DictReader((out / "predictions" / "pacs.csv").open(encoding="utf-8")))
    assert sorted(Path(r["path"]) for r in rows) == images
    assert all(not r["error"] and r["prediction"] in [*known, "unknown"] for r in rows)

    # the written weights and SD folder are found again by the next rehearsal
    cache = out / "cache"
    assert rehearsal.marker_matches(
        cache / "sd-tiny-random-seed0" / rehearsal.SD_MARKER, rehearsal.sd_settings("tiny", 0)
    )
