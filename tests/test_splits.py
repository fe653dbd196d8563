"""Exact split memberships, by class name, for every benchmark and split family."""

from __future__ import annotations

from pathlib import Path

import pytest

from seeclip.datasets import BENCHMARKS, get_benchmark, load_folder_spec, make_split

FOLDER_YAML = """
domains: [photo, sketch, cartoon]
known: [cat, dog, bird]
unknown: [fish]
daml:
  source_classes: [[cat, dog], [dog, bird]]
  target_known: [cat, bird]
"""


def _spec(name: str, tmp_path: Path):
    if name == "folder":
        (tmp_path / "classes.yaml").write_text(FOLDER_YAML)
        return get_benchmark("folder", classes_file=tmp_path / "classes.yaml")
    return get_benchmark(name)


def _cases() -> list[tuple[str, str, str]]:
    cases = [("folder", p, t) for p in ("full", "daml") for t in ("photo", "sketch", "cartoon")]
    for name, entry in BENCHMARKS.items():
        if entry.spec is not None:
            cases += [(name, p, t) for p in entry.spec.protocols for t in entry.spec.targets]
    return cases


def test_registry_lists_every_benchmark():
    assert list(BENCHMARKS) == sorted(
        [
            "digits",
            "digits_dg",
            "folder",
            "glyphs",
            "mini_domainnet",
            "multi_dataset",
            "office_home",
            "pacs",
            "vlcs",
        ]
    )


@pytest.mark.parametrize(("name", "protocol", "target"), _cases())
def test_every_split_is_valid(name, protocol, target, tmp_path):
    spec = _spec(name, tmp_path)
    s = make_split(spec, protocol, target)
    assert s.target == target and target not in s.source_domains
    assert not set(s.known) & set(s.unknown)
    assert set(s.known) | set(s.unknown) <= set(spec.classes)
    assert set(s.source_classes) == set(s.source_domains)
    seen = set()
    for domain, classes in s.source_classes.items():
        assert classes and set(classes) <= set(s.known), domain
        seen |= set(classes)
    assert seen == set(s.known)  # every known class is trained on somewhere
    assert set(s.target_known) <= set(s.known)
    assert s.target_unknown == s.unknown
    assert [s.label(c) for c in s.known] == list(range(len(s.known)))
    assert all(s.label(c) == -1 for c in s.unknown)
    if spec.source_domains is None:  # leave-one-domain-out, benchmark domain order
        assert s.source_domains == tuple(d for d in spec.domains if d != target)
    assert all(spec.class_text(c) for c in s.known + s.unknown)


def test_pacs():
    spec = get_benchmark("pacs")
    s = make_split(spec, "daml", "photo")
    assert s.source_domains == ("art_painting", "cartoon", "sketch")
    assert set(s.source_classes["art_painting"]) == {"guitar", "dog", "elephant"}
    assert set(s.source_classes["cartoon"]) == {"horse", "dog", "giraffe"}
    assert set(s.source_classes["sketch"]) == {"house", "elephant", "giraffe"}
    assert s.unknown == ("person",)
    assert s.known == ("dog", "elephant", "giraffe", "guitar", "horse", "house")
    assert set(s.target_known) == set(s.known)
    # src1..src3 follow the domain order after removing the target
    s = make_split(spec, "daml", "art_painting")
    assert s.source_domains == ("cartoon", "photo", "sketch")
    assert set(s.source_classes["cartoon"]) == {"guitar", "dog", "elephant"}
    assert set(s.source_classes["sketch"]) == {"house", "elephant", "giraffe"}
    full = make_split(spec, "full", "sketch")
    assert all(c == full.known for c in full.source_classes.values())
    assert full.unknown == ("person",)


def test_vlcs():
    s = make_split(get_benchmark("vlcs"), "daml", "VOC2007")
    assert s.source_domains == ("Caltech101", "LabelMe", "SUN09")
    assert [set(s.source_classes[d]) for d in s.source_domains] == [
        {"bird", "car"},
        {"car", "chair"},
        {"chair", "dog"},
    ]
    assert s.known == ("bird", "car", "chair", "dog") and s.unknown == ("person",)
    assert set(s.target_known) == set(s.known)
    assert s.label("person") == -1 and s.label("dog") == 3


OH_UNKNOWN = (
    "Clipboards",
    "Scissors",
    "TV",
    "Curtains",
    "Fork",
    "Soda",
    "Table",
    "Knives",
    "Oven",
    "Refrigerator",
    "Marker",
)


def test_office_home():
    spec = get_benchmark("office_home")
    assert len(spec.classes) == 65 and spec.classes[:3] == ("Drill", "Exit_Sign", "Bottle")
    s = make_split(spec, "daml", "Product")
    assert s.source_domains == ("Art", "Clipart", "Real_World")
    assert len(s.known) == 54 and s.known[0] == "Drill" and s.known[53] == "Candles"
    assert s.known[17] == "ToothBrush" and s.known[32] == "Backpack"
    assert s.unknown == OH_UNKNOWN
    assert set(s.target_known) == {
        "Drill",
        "Glasses",
        "Computer",
        "Laptop",
        "Kettle",
        "Bed",
        "Hammer",
        "Mug",
        "Webcam",
        "Desk_Lamp",
        "Backpack",
        "Alarm_Clock",
        "Push_Pin",
        "Printer",
        "Speaker",
        "Eraser",
    }
    src1, src2, src3 = (set(s.source_classes[d]) for d in s.source_domains)
    assert len(src1) == 26 and {"Pencil", "Mug", "Notebook"} <= src1 and "Bed" not in src1
    assert len(src2) == 26 and {"Sink", "Bed", "Postit_Notes", "Backpack", "Trash_Can"} <= src2
    assert "Laptop" not in src2 and "Printer" not in src2
    assert len(src3) == 26 and {"Bottle", "Laptop", "Printer", "Candles"} <= src3
    assert "Glasses" not in src3
    full = make_split(spec, "full", "Art")
    assert full.known == s.known and full.unknown == OH_UNKNOWN
    medic = make_split(spec, "medic", "Art")
    assert medic.known[:3] == ("Alarm_Clock", "Backpack", "Batteries") and medic.known[-1] == "Oven"
    assert len(medic.known) == 40 and len(medic.unknown) == 25 and "Pan" in medic.unknown
    assert spec.class_text("Exit_Sign") == "exit sign"


def test_mini_domainnet():
    spec = get_benchmark("mini_domainnet")
    assert len(spec.classes) == 126 and list(spec.classes) == sorted(spec.classes)
    assert spec.classes[0] == "The_Eiffel_Tower" and spec.classes[125] == "zebra"
    s = make_split(spec, "daml", "real")
    assert s.source_domains == ("clipart", "painting", "sketch")
    assert len(s.known) == 90 and len(s.unknown) == 36
    assert s.known[-1] == "pineapple" and s.unknown[0] == "potato" and s.unknown[-1] == "zebra"
    assert len(s.target_known) == 40
    assert {
        "The_Eiffel_Tower",
        "ant",
        "banana",
        "broccoli",
        "candle",
        "chair",
        "dog",
        "duck",
        "monkey",
        "mushroom",
        "pear",
        "pig",
    } <= set(s.target_known)
    assert not {"anvil", "axe", "bus", "cactus", "dumbbell", "pineapple"} & set(s.target_known)
    src1, src2, src3 = (set(s.source_classes[d]) for d in s.source_domains)
    assert len(src1) == len(src2) == len(src3) == 40
    assert {"The_Eiffel_Tower", "butterfly", "crab", "giraffe"} <= src1 and "cactus" not in src1
    assert {"basket", "cactus", "cow", "onion", "pineapple"} <= src2 and "crab" not in src2
    assert {"bathtub", "elephant", "goatee", "mushroom"} <= src3 and "ant" not in src3
    assert "fish" not in src3  # index 53: src1 only


MD_TARGET_KNOWN = (
    "back_pack",
    "bike",
    "calculator",
    "desk_chair",
    "headphones",
    "keyboard",
    "mobile_phone",
    "mug",
    "phone",
    "scissors",
    "airplane",
    "bus",
    "car",
    "horse",
    "knife",
    "motorbike",
    "skateboard",
    "train",
    "truck",
    "bird",
    "cat",
    "dog",
    "monkey",
)
MD_UNKNOWN = (
    "ant",
    "apple",
    "banana",
    "basket",
    "butterfly",
    "candle",
    "cookie",
    "eyeglasses",
    "grapes",
    "ice_cream",
    "mailbox",
    "necklace",
    "octopus",
    "piano",
    "potato",
    "roller_coaster",
    "snail",
    "snowman",
    "star",
    "violin",
)


def test_multi_dataset():
    spec = get_benchmark("multi_dataset")
    assert len(spec.classes) == 68 and spec.targets[:4] == ("clipart", "painting", "real", "sketch")
    s = make_split(spec, "daml", "clipart")
    assert s.source_domains == ("amazon", "stl10", "visda_syn")
    assert len(s.known) == 48 and s.known[30] == "trash_can" and s.known[47] == "ship"
    assert s.target_known == MD_TARGET_KNOWN and s.unknown == MD_UNKNOWN
    assert s.source_classes["amazon"] == s.known[:31]
    assert set(s.source_classes["visda_syn"]) == {
        "bike",
        "airplane",
        "bus",
        "car",
        "horse",
        "knife",
        "motorbike",
        "person",
        "plant",
        "skateboard",
        "train",
        "truck",
    }
    assert set(s.source_classes["stl10"]) == {
        "airplane",
        "car",
        "horse",
        "truck",
        "bird",
        "cat",
        "deer",
        "dog",
        "monkey",
        "ship",
    }
    assert spec.folder_aliases("real")["backpack"] == "back_pack"
    assert spec.folder_aliases("visda_syn")["aeroplane"] == "airplane"
    with pytest.raises(ValueError, match="no protocol 'full'; available protocols: daml"):
        make_split(spec, "full", "clipart")
    with pytest.raises(ValueError, match="valid targets: clipart, painting"):
        make_split(spec, "daml", "amazon")


def test_digits_benchmarks():
    dg = get_benchmark("digits_dg")
    s = make_split(dg, "daml", "svhn")
    assert s.source_domains == ("mnist", "mnist_m", "syn")
    assert [set(s.source_classes[d]) for d in s.source_domains] == [
        {"0", "1", "2"},
        {"2", "3", "4"},
        {"4", "5", "6"},
    ]
    assert s.unknown == ("7", "8", "9") and len(s.target_known) == 7
    assert dg.class_text("3") == "three"
    medic = make_split(dg, "full", "mnist")
    assert medic.known == ("0", "1", "2", "3", "4", "5") and medic.unknown == ("6", "7", "8", "9")

    emb = get_benchmark("digits")
    assert emb.domains == ("handwritten", "printed", "textured", "outline")
    s = make_split(emb, "full", "outline")
    assert s.known == ("zero", "one", "two", "three", "four", "five")
    assert s.unknown == ("six", "seven", "eight", "nine")
    d = make_split(emb, "daml", "handwritten")
    assert [set(d.source_classes[x]) for x in ("printed", "textured", "outline")] == [
        {"zero", "one", "two"},
        {"two", "three", "four"},
        {"four", "five", "six"},
    ]
    assert d.unknown == ("seven", "eight", "nine") and len(d.target_known) == 7
    assert emb.template.format(emb.class_text("zero")) == "a photo of the digit zero."


def test_folder_spec(tmp_path):
    s = make_split(_spec("folder", tmp_path), "daml", "cartoon")
    assert s.source_domains == ("photo", "sketch")
    assert s.source_classes == {"photo": ("cat", "dog"), "sketch": ("dog", "bird")}
    assert s.target_known == ("cat", "bird") and s.unknown == ("fish",)


def test_folder_spec_domains_from_tree(tmp_path):
    (tmp_path / "b_dom").mkdir()
    (tmp_path / "a_dom").mkdir()
    (tmp_path / "c.yaml").write_text("known: [x]\nunknown: [y]\n")
    spec = load_folder_spec(tmp_path / "c.yaml", tmp_path)
    assert spec.domains == ("a_dom", "b_dom") and list(spec.protocols) == ["full"]


def test_folder_spec_rejects_unknown_key(tmp_path):
    (tmp_path / "c.yaml").write_text("known: [x]\nunknown: [y]\nclases: [z]\n")
    with pytest.raises(
        ValueError, match=r"unknown key 'clases'; allowed keys: description, domains"
    ):
        load_folder_spec(tmp_path / "c.yaml", tmp_path)


def test_bad_requests_name_the_valid_choices():
    with pytest.raises(ValueError, match="available protocols: full, daml"):
        make_split(get_benchmark("pacs"), "medic", "photo")
    with pytest.raises(ValueError, match="valid targets: art_painting, cartoon, photo, sketch"):
        make_split(get_benchmark("pacs"), "daml", "clipart")
    with pytest.raises(KeyError, match="choose one of"):
        get_benchmark("pacs2")
    with pytest.raises(ValueError, match="pass --classes FILE"):
        get_benchmark("folder")
