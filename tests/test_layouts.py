"""Layout loaders, manifests and split selection on tiny generated trees (1x1 images)."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seeclip.datasets import (
    DataLayoutError,
    Sample,
    default_manifest_path,
    get_benchmark,
    load_manifest,
    make_split,
    prepare,
    select,
    source_val_mask,
)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


def _touch(path: Path, data: bytes = PNG) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tree(base: Path, domains, classes, n: int = 1, splits=(None,), ext: str = ".png") -> None:
    for d in domains:
        for sp in splits:
            for c in classes:
                for i in range(n):
                    _touch(base / d / (sp or "") / c / f"{c}{i}{ext}")


def _pacs(root: Path, n: int = 1) -> Path:
    spec = get_benchmark("pacs")
    _tree(root / "PACS", spec.domains, spec.classes, n=n, ext=".jpg")
    return root


def test_pacs_folders_from_either_root(tmp_path):
    spec = get_benchmark("pacs")
    _pacs(tmp_path)
    m = prepare(spec, tmp_path)
    assert len(m.samples) == 4 * 7
    assert Sample("PACS/photo/dog/dog0.jpg", "dog", "photo", "all") in m.samples
    inner = prepare(spec, tmp_path / "PACS", out=tmp_path / "inner.csv")
    assert {(s.class_name, s.domain) for s in inner.samples} == {
        (s.class_name, s.domain) for s in m.samples
    }
    assert Sample("photo/dog/dog0.jpg", "dog", "photo", "all") in inner.samples
    assert inner.abspath(inner.samples[0]).is_file()


def test_wrong_root_names_the_expected_layout(tmp_path):
    with pytest.raises(
        DataLayoutError,
        match=r"no PACS data under .*: expected .*/PACS/<domain>/<class>/\*\.jpg with domains "
        r"art_painting, cartoon, photo, sketch \(pass --data-root pointing at the folder that "
        r"contains PACS\)",
    ):
        prepare(get_benchmark("pacs"), tmp_path)
    with pytest.raises(DataLayoutError, match="is not a folder.*pass --data-root"):
        prepare(get_benchmark("pacs"), tmp_path / "nowhere")


def test_missing_domain(tmp_path):
    shutil.rmtree(_pacs(tmp_path) / "PACS" / "sketch")
    with pytest.raises(DataLayoutError, match="missing domain.*: sketch .*add the missing domain"):
        prepare(get_benchmark("pacs"), tmp_path)


def test_missing_class_folders_listed_per_domain(tmp_path):
    _pacs(tmp_path)
    shutil.rmtree(tmp_path / "PACS" / "photo" / "person")
    shutil.rmtree(tmp_path / "PACS" / "sketch" / "dog")
    (tmp_path / "PACS" / "sketch" / "horse" / "horse0.jpg").unlink()  # empty folder
    with pytest.raises(
        DataLayoutError,
        match=r"missing or empty class folders .*: photo: person; sketch: dog, horse .*rename",
    ):
        prepare(get_benchmark("pacs"), tmp_path)


def test_extra_class_folder(tmp_path):
    _touch(_pacs(tmp_path) / "PACS" / "photo" / "people" / "a.jpg")
    with pytest.raises(DataLayoutError, match=r"unexpected class folders .*photo: people .*rename"):
        prepare(get_benchmark("pacs"), tmp_path)


def test_empty_domain(tmp_path):
    _pacs(tmp_path)
    for f in (tmp_path / "PACS" / "cartoon").rglob("*.jpg"):
        f.unlink()
    with pytest.raises(DataLayoutError, match=r"no images in domain\(s\) cartoon .*re-extract"):
        prepare(get_benchmark("pacs"), tmp_path)


def test_class_case_tolerated_only_when_unambiguous(tmp_path):
    _pacs(tmp_path)
    (tmp_path / "PACS" / "photo" / "dog").rename(tmp_path / "PACS" / "photo" / "Dog")
    m = prepare(get_benchmark("pacs"), tmp_path, check_images=False)
    assert Sample("PACS/photo/Dog/dog0.jpg", "dog", "photo", "all") in m.samples
    _touch(tmp_path / "PACS" / "photo" / "DOG" / "x.jpg")  # now "Dog" and "DOG" compete
    with pytest.raises(DataLayoutError, match="unexpected class folders .*photo: DOG, Dog"):
        prepare(get_benchmark("pacs"), tmp_path, check_images=False)


def test_office_home_train_val_subfolders(tmp_path):
    spec = get_benchmark("office_home")
    base = tmp_path / "office_home" / "OfficeHomeDataset_10072016"
    _tree(base, ["Art", "Clipart", "Product", "Real World"], spec.classes, splits=("train", "val"))
    m = prepare(spec, tmp_path, check_images=False)
    assert len(m.samples) == 4 * 65 * 2
    assert m.counts()["Real_World"] == {"train": 65, "val": 65}
    real = Sample(
        "office_home/OfficeHomeDataset_10072016/Real World/val/Drill/Drill0.png",
        "Drill",
        "Real_World",
        "val",
    )
    assert real in m.samples
    data = select(m, make_split(spec, "daml", "Real_World"))
    assert data.target_split == "all"  # no "test" images: the whole target domain is evaluated
    assert {m.samples[i].split for i in data.target} == {"train", "val"}
    assert len(data.target) == 2 * (16 + 11)


def test_vlcs_split_folders_and_selection(tmp_path):
    spec = get_benchmark("vlcs")
    _tree(
        tmp_path / "VLCS",
        ["CALTECH", "LABELME", "SUN", "PASCAL"],
        spec.classes,
        n=2,
        splits=("train", "crossval", "test"),
    )
    m = prepare(spec, tmp_path, check_images=False)
    assert m.counts()["VOC2007"] == {"train": 10, "val": 10, "test": 10}
    data = select(m, make_split(spec, "daml", "VOC2007"), val_fraction=0.25)
    assert data.target_split == "test"
    assert all(m.samples[i].split == "test" for i in data.target) and len(data.target) == 10
    src = np.concatenate([data.source_train, data.source_val])
    assert all(m.samples[i].split in ("train", "val") for i in src)
    assert len(src) == 4 * 2 * 3  # 2 classes per source, 4 images (train + crossval) each
    assert all(m.samples[i].class_name != "person" for i in src)
    assert len(data.source_val) == 2 * 3  # one of four per (domain, class)
    assert sorted(set(data.target_labels.tolist())) == [-1, 0, 1, 2, 3]


def test_digits_dg_train_val(tmp_path):
    spec = get_benchmark("digits_dg")
    _tree(tmp_path / "digits_dg", spec.domains, spec.classes, splits=("train", "val"), ext=".jpg")
    m = prepare(spec, tmp_path, check_images=False)
    assert len(m.samples) == 80
    assert Sample("digits_dg/svhn/val/7/70.jpg", "7", "svhn", "val") in m.samples


def _mini(root: Path, spec) -> Path:
    base = root / "domainnet"
    (base / "splits_mini").mkdir(parents=True)
    for d in spec.domains:
        for sp in ("train", "test"):
            lines = []
            for label, c in enumerate(spec.classes):
                rel = f"{d}/{c}/{d}_{sp}_{label}.jpg"
                _touch(base / rel)
                lines.append(f"{rel} {label}")
            (base / "splits_mini" / f"{d}_{sp}.txt").write_text("\n".join(lines) + "\n")
    return base


def test_mini_domainnet_split_files(tmp_path):
    spec = get_benchmark("mini_domainnet")
    base = _mini(tmp_path, spec)
    m = prepare(spec, tmp_path, check_images=False)
    assert len(m.samples) == 4 * 2 * 126
    assert Sample("domainnet/real/zebra/real_test_125.jpg", "zebra", "real", "test") in m.samples
    data = select(m, make_split(spec, "daml", "sketch"))
    assert data.target_split == "test" and len(data.target) == 40 + 36
    # inconsistent labels: zebra listed with two different labels
    f = base / "splits_mini" / "clipart_test.txt"
    f.write_text(f.read_text().replace("clipart_test_125.jpg 125", "clipart_test_125.jpg 3"))
    with pytest.raises(DataLayoutError, match="label 3 for class 'zebra'.*original"):
        prepare(spec, tmp_path, check_images=False)
    f.unlink()
    with pytest.raises(DataLayoutError, match="missing split file.*clipart_test.txt.*splits_mini"):
        prepare(spec, tmp_path, check_images=False)


def test_mini_domainnet_listed_image_missing(tmp_path):
    spec = get_benchmark("mini_domainnet")
    base = _mini(tmp_path, spec)
    (base / "real" / "ant" / "real_train_4.jpg").unlink()
    with pytest.raises(DataLayoutError, match="1 listed image.*not on disk.*real_train_4.jpg"):
        prepare(spec, tmp_path, check_images=False)


def test_multi_dataset_lists_and_folders(tmp_path):
    spec = get_benchmark("multi_dataset")
    base = tmp_path / "multi_dataset"
    for d in ("amazon", "stl10", "visda_syn", "clipart", "painting", "sketch"):
        lines = []
        for c in spec.expected_classes(d):
            _touch(base / "images" / d / f"{c}.jpg")
            lines.append(f"images/{d}/{c}.jpg {spec.classes.index(c)}")
        (base / f"{d}_list.txt" if d == "stl10" else base / f"{d}.txt").write_text("\n".join(lines))
    # `real` as a DomainNet class-folder tree: aliases map its names, other classes are ignored
    folder = {
        "backpack": "back_pack",
        "bicycle": "bike",
        "chair": "desk_chair",
        "cell_phone": "mobile_phone",
        "telephone": "phone",
    }
    for c in spec.expected_classes("real"):
        name = next((k for k, v in folder.items() if v == c), c)
        _touch(base / "domainnet" / "real" / name / "1.jpg")
    _touch(base / "domainnet" / "real" / "zigzag" / "1.jpg")
    _touch(base / "domainnet" / "real" / "mouse" / "1.jpg")  # a known name, not a target class
    m = prepare(spec, tmp_path, check_images=False)
    counts = {d: sum(v.values()) for d, v in m.counts().items()}
    assert counts == {
        "amazon": 31,
        "stl10": 10,
        "visda_syn": 12,
        "clipart": 43,
        "painting": 43,
        "real": 43,
        "sketch": 43,
    }
    assert Sample("multi_dataset/domainnet/real/backpack/1.jpg", "back_pack", "real", "all") in (
        m.samples
    )
    data = select(m, make_split(spec, "daml", "real"), val_fraction=0.0)
    assert len(data.source_train) == 31 + 10 + 12 and len(data.source_val) == 0
    assert (data.target_labels == -1).sum() == 20 and len(data.target) == 43
    (base / "painting.txt").write_text("images/painting/ant.jpg 68\n")
    with pytest.raises(DataLayoutError, match="label 68 is outside 0..67"):
        prepare(spec, tmp_path, check_images=False)


def test_corrupt_images_fail_or_are_skipped(tmp_path):
    spec = get_benchmark("pacs")
    _pacs(tmp_path, n=2)
    _touch(tmp_path / "PACS" / "photo" / "dog" / "dog1.jpg", b"not an image")
    bad = r"1 unreadable or corrupt image.*photo/dog/dog1\.jpg.*rerun with --skip-corrupt"
    with pytest.raises(DataLayoutError, match=bad):
        prepare(spec, tmp_path)
    assert not default_manifest_path(spec, tmp_path).exists()
    m = prepare(spec, tmp_path, skip_corrupt=True)
    assert m.n_skipped == 1 and m.skipped == ("PACS/photo/dog/dog1.jpg",)
    assert len(m.samples) == 4 * 7 * 2 - 1
    meta = json.loads(default_manifest_path(spec, tmp_path).with_suffix(".json").read_text())
    assert meta["n_skipped"] == 1 and meta["skipped"] == ["PACS/photo/dog/dog1.jpg"]
    assert load_manifest(spec, tmp_path).n_skipped == 1


def test_manifest_written_once_and_round_trips(tmp_path):
    spec = get_benchmark("pacs")
    _pacs(tmp_path, n=2)
    with pytest.raises(FileNotFoundError, match="run `seeclip prepare pacs --data-root"):
        load_manifest(spec, tmp_path)
    m = prepare(spec, tmp_path)
    path = default_manifest_path(spec, tmp_path)
    assert m.path == path and path.parent.parent.name.startswith("seeclip_home")
    assert path.read_text().splitlines()[0] == "path,class_name,domain,split"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.stem + ".json"]
    stamp = path.stat().st_mtime_ns
    loaded = load_manifest(spec, tmp_path)
    select(loaded, make_split(spec, "full", "photo"))
    assert loaded.samples == m.samples and loaded.root == m.root
    assert path.stat().st_mtime_ns == stamp  # loading and selecting never rewrite it
    shutil.rmtree(tmp_path / "PACS")  # nothing is rescanned after prepare
    assert load_manifest(spec, tmp_path).samples == m.samples


def _samples(n_per_class: int) -> list[Sample]:
    return [
        Sample(f"{d}/{c}/{i}.png", c, d, "all")
        for d in ("a", "b")
        for c in ("x", "y", "z")
        for i in range(n_per_class)
    ]


def test_source_val_mask_is_stratified_and_order_free():
    samples = _samples(20)
    mask = source_val_mask(samples, fraction=0.1, seed=0)
    for d in ("a", "b"):
        for c in ("x", "y", "z"):
            group = [
                m for s, m in zip(samples, mask, strict=True) if s.path.startswith(f"{d}/{c}/")
            ]
            assert sum(group) == 2
    assert np.array_equal(mask, source_val_mask(samples, fraction=0.1, seed=0))
    held = {s.path for s, m in zip(samples, mask, strict=True) if m}
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    mask2 = source_val_mask(shuffled, fraction=0.1, seed=0)
    assert {s.path for s, m in zip(shuffled, mask2, strict=True) if m} == held
    other = source_val_mask(samples, fraction=0.1, seed=1)
    assert {s.path for s, m in zip(samples, other, strict=True) if m} != held
    assert not source_val_mask(_samples(1), fraction=0.5).any()  # keep one image to train on
    with pytest.raises(ValueError, match="fraction"):
        source_val_mask(samples, fraction=1.0)


def test_select_honours_daml_subsets(tmp_path):
    spec = get_benchmark("pacs")
    _pacs(tmp_path, n=10)
    m = prepare(spec, tmp_path, check_images=False)
    split = make_split(spec, "daml", "photo")
    data = select(m, split)
    src = np.concatenate([data.source_train, data.source_val])
    assert not set(data.source_train) & set(data.source_val)
    by_domain: dict[str, set[str]] = {}
    for i in src:
        by_domain.setdefault(m.samples[i].domain, set()).add(m.samples[i].class_name)
    assert by_domain == {
        "art_painting": {"guitar", "dog", "elephant"},
        "cartoon": {"horse", "dog", "giraffe"},
        "sketch": {"house", "elephant", "giraffe"},
    }
    assert len(data.source_val) == 9 and len(data.source_train) == 81
    assert all(m.samples[i].domain == "photo" for i in data.target) and len(data.target) == 70
    labels = [split.known.index(m.samples[i].class_name) for i in data.source_train]
    assert data.source_train_labels.tolist() == labels
    person = [i for i in data.target if m.samples[i].class_name == "person"]
    assert len(person) == 10 and (data.target_labels[np.isin(data.target, person)] == -1).all()


def test_folder_benchmark_with_user_yaml(tmp_path):
    data_root = tmp_path / "mydata"
    _tree(data_root, ["photo", "sketch", "toon"], ["Cat", "dog", "bird", "fish"], n=2)
    yaml_path = tmp_path / "classes.yaml"
    yaml_path.write_text(
        "known: [cat, dog, bird]\nunknown: [fish]\ntemplate: 'a drawing of a {}.'\n"
        "daml: {source_classes: [[cat, dog], [dog, bird]], target_known: [cat]}\n"
    )
    spec = get_benchmark("folder", classes_file=yaml_path, data_root=data_root)
    assert spec.domains == ("photo", "sketch", "toon")  # sorted folder names
    m = prepare(spec, data_root)
    assert Sample("photo/Cat/Cat0.png", "cat", "photo", "all") in m.samples
    data = select(load_manifest(spec, data_root), make_split(spec, "daml", "toon"))
    assert {m.samples[i].class_name for i in data.target} == {"cat", "fish"}
    yaml_path.write_text("known: [cat, dog, bird]\nunknown: [fish]\ntemplates: x\n")
    with pytest.raises(ValueError, match="unknown key 'templates'; allowed keys: .*template"):
        get_benchmark("folder", classes_file=yaml_path, data_root=data_root)
    yaml_path.write_text("known: [cat, dog]\nunknown: [fish]\n")
    with pytest.raises(DataLayoutError, match="unexpected class folders.*bird.*in your YAML"):
        prepare(get_benchmark("folder", classes_file=yaml_path, data_root=data_root), data_root)
