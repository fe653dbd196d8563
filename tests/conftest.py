import importlib.util
import os
from pathlib import Path

# before anything imports huggingface_hub, which reads it once at import: tests never go online
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from seeclip.cli import main


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own SEECLIP_HOME, so nothing reads or writes the user's cache."""
    monkeypatch.setenv("SEECLIP_HOME", str(tmp_path_factory.mktemp("seeclip_home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def load_script():
    """``load_script("decisive_table")``: a module of ``scripts/``, imported from its file."""

    def load(name: str):
        path = Path(__file__).parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def pytest_configure(config):
    torch.set_num_threads(1)  # tiny models: threads only add overhead


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory):
    """A SEECLIP_HOME with the digits benchmark at 6 images per class and domain, prepared once."""
    home = tmp_path_factory.mktemp("digits_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("SEECLIP_HOME", str(home))
    assert main(["prepare", "digits", "--n-per-class", "6", "--no-progress"]) == 0
    mp.undo()
    return home
