"""Fuzzing what users type and what their files hold (Hypothesis).

The property, at every command-line entry point tried here: exit 0 with a result, or exit 2
(1 where nothing could be read) with one line naming the problem; never a traceback, a hang or a
write outside the runs folder. The fast examples run with the suite; `-m slow` runs thousands.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from seeclip.cli import main
from seeclip.config import to_dict
from seeclip.run_config import RunConfig

ERROR_LINE = re.compile(r"^seeclip( [\w-]+)?: error: ")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
# the slow suite's count; SEECLIP_FUZZ_EXAMPLES=3000 for a thorough run (docs/reliability.md)
MANY = settings(
    max_examples=int(os.environ.get("SEECLIP_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def _keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


KEYS = _keys(to_dict(RunConfig()))
NASTY = [
    "nan",
    "inf",
    "-inf",
    ".nan",
    "true",
    "null",
    "~",
    "[1, 2]",
    "{a: 1}",
    "1e309",
    "-1",
    "0",
    "1e-3",
    "[",
    "]",
    "'",
    '"',
    "*a",
    "&a x",
    "!!python/object:os.system",
    "2**64",
    "../../etc",
    "a/b",
    "",
    " ",
    "\x00",
    "é",
    "1_000",
    "0x10",
    "0o7",
    "1:30",
    "- x",
]
VALUES = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=12),
    st.integers().map(str),
    st.floats().map(str),
)
OVERRIDES = st.lists(
    st.one_of(st.builds("{}={}".format, st.sampled_from(KEYS), VALUES), st.text(max_size=24)),
    max_size=3,
)


@contextlib.contextmanager
def _alarm(seconds: int):
    """A hang fails the example instead of the suite."""

    def fail(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(argv: list[str], seconds: int = 60) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with _alarm(seconds), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def _assert_answered(code: int, err: str, ok=(0,)) -> None:
    assert "Traceback" not in err, err
    if code in ok:
        return
    assert code in (1, 2), (code, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("usage:")]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    assert len(errors) == 1, err


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture(scope="module")
def digits_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEECLIP_HOME", str(home))
    assert main(["prepare", "digits", "--n-per-class", "2", "--no-progress"]) == 0
    mp.undo()
    return home


# ------------------------------------------------------------- typed overrides and YAML files


def _check_overrides(overrides, home: Path, tmp: Path) -> None:
    runs = tmp / "runs"
    before = _files(home)
    argv = ["sweep", "--config", "digits", "--methods", "zeroshot", "--dry-run"]
    code, _, err = _run([*argv, "--runs-dir", str(runs), *overrides])
    _assert_answered(code, err)
    assert _files(home) == before  # a dry run writes nothing, anywhere


@FAST
@given(overrides=OVERRIDES)
def test_any_override_is_taken_or_refused_in_one_line(
    overrides, digits_home, tmp_path, monkeypatch
):
    monkeypatch.setenv("SEECLIP_HOME", str(digits_home))
    _check_overrides(overrides, digits_home, tmp_path)


@pytest.mark.slow
@MANY
@given(overrides=OVERRIDES)
def test_any_override_is_taken_or_refused_in_one_line_many(
    overrides, digits_home, tmp_path, monkeypatch
):
    monkeypatch.setenv("SEECLIP_HOME", str(digits_home))
    _check_overrides(overrides, digits_home, tmp_path)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
YAML_DATA = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from([*KEYS, *(k.split(".")[0] for k in KEYS), "x"]), inner, max_size=4
        ),
    ),
    max_leaves=12,
)


def _yaml_text(data) -> str:
    import yaml

    return yaml.safe_dump(data)


CONFIG_TEXT = st.one_of(
    YAML_DATA.map(_yaml_text),
    st.text(max_size=80),
    st.sampled_from(
        [
            "data: [",
            "a: b: c",
            "!!python/object/apply:os.system ['true']",
            "\t- x",
            "data:\n  benchmark: digits\n  target: ../../x",
            "&a [*a]",
        ]
    ),
)


def _check_config_file(text: str, home: Path, tmp: Path) -> None:
    path = tmp / "preset.yaml"
    path.write_text(text)
    before = _files(home)
    argv = ["sweep", "--config", str(path), "--methods", "zeroshot", "--dry-run"]
    code, _, err = _run([*argv, "--runs-dir", str(tmp / "runs")])
    _assert_answered(code, err)
    assert _files(home) == before


@FAST
@given(text=CONFIG_TEXT)
def test_any_config_file_is_read_or_refused_in_one_line(text, digits_home, tmp_path, monkeypatch):
    monkeypatch.setenv("SEECLIP_HOME", str(digits_home))
    _check_config_file(text, digits_home, tmp_path)


@pytest.mark.slow
@MANY
@given(text=CONFIG_TEXT)
def test_any_config_file_is_read_or_refused_in_one_line_many(
    text, digits_home, tmp_path, monkeypatch
):
    monkeypatch.setenv("SEECLIP_HOME", str(digits_home))
    _check_config_file(text, digits_home, tmp_path)


# ------------------------------------------------------------------------------ image files

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "LA", "YCbCr"]
FORMATS = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "WEBP": ".webp",
}


@st.composite
def image_files(draw):
    """(bytes, suffix): a real image in an odd mode or format, or garbage under an image name."""
    suffix = draw(st.sampled_from(sorted(set(FORMATS.values()))))
    if draw(st.booleans()):
        return draw(st.binary(max_size=200)), suffix
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(sorted(FORMATS)))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # a mode this format cannot hold
        image.convert("RGB").save(buf, format=fmt)
    data = buf.getvalue()
    if draw(st.booleans()):  # cut short
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data, FORMATS[fmt] if draw(st.booleans()) else suffix  # maybe the wrong extension


def _check_image(data: bytes, suffix: str, tmp: Path) -> None:
    from seeclip.datasets.images import ImageReadError, load_image

    path = tmp / f"x{suffix}"
    path.write_bytes(data)
    try:
        with _alarm(20):
            image = load_image(path)
    except ImageReadError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert image.mode == "RGB" and min(image.size) >= 1


@FAST
@given(case=image_files())
def test_any_image_file_reads_as_rgb_or_one_error(case, tmp_path):
    _check_image(*case, tmp_path)


@pytest.mark.slow
@MANY
@given(case=image_files())
def test_any_image_file_reads_as_rgb_or_one_error_many(case, tmp_path):
    _check_image(*case, tmp_path)


# ----------------------------------------------------------------- damaged run folders


@pytest.fixture(scope="module")
def finished_run(digits_home, tmp_path_factory):
    runs = tmp_path_factory.mktemp("fuzz_runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEECLIP_HOME", str(digits_home))
    argv = [
        "eval",
        "--benchmark",
        "digits",
        "--method",
        "coop",
        "--backbone",
        "tiny-vit",
        "--target",
        "printed",
        "--runs-dir",
        str(runs),
        "--no-progress",
        "train.epochs=1",
        "train.batch_size=8",
        "data.val_fraction=0.5",
    ]
    assert main(argv) == 0
    mp.undo()
    (run,) = {p.parent for p in runs.glob("*/*/done")}
    return run


DAMAGE = st.sampled_from(["truncate", "garbage", "delete", "directory", "fifo", "empty"])


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(
        ["config.yaml", "results.jsonl", "model.safetensors", "done", "predictions.npz"]
    ),
    damage=DAMAGE,
    at=st.floats(0, 1),
)
def test_a_damaged_run_folder_is_reported_or_refused_in_one_line(
    name, damage, at, finished_run, digits_home, tmp_path, monkeypatch
):
    monkeypatch.setenv("SEECLIP_HOME", str(digits_home))
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example
    runs = tmp_path / "runs"
    run = runs / finished_run.parent.name / finished_run.name
    shutil.copytree(finished_run, run)
    target = run / name
    data = target.read_bytes() if target.is_file() else b""
    target.unlink(missing_ok=True)
    if damage == "truncate":
        target.write_bytes(data[: int(at * len(data))])
    elif damage == "garbage":
        target.write_bytes(bytes(np.random.default_rng(int(at * 1000)).integers(0, 256, 64)))
    elif damage == "directory":
        target.mkdir()
    elif damage == "fifo":
        os.mkfifo(target)
    elif damage == "empty":
        target.write_bytes(b"")
    images = sorted(digits_home.rglob("printed/*/*.png"))[:2]
    outside = _files(digits_home)
    code, _, err = _run(["report", str(runs), "--out", str(tmp_path / "report"), "--no-plots"])
    _assert_answered(code, err)
    code, _, err = _run(["predict", "--run", str(run), *map(str, images), "--no-progress"])
    _assert_answered(code, err)
    assert _files(digits_home) == outside
