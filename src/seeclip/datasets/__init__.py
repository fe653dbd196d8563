"""OSDG benchmarks: specs and splits by class name, on-disk layouts, manifests, split selection.

Importing this package reads the packaged spec files (``specs/*.yaml``) into ``BENCHMARKS``.
"""

from seeclip.datasets.layouts import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    SPLITS,
    DataLayoutError,
    Sample,
    describe_benchmark,
    expected_layout,
    load_samples,
)
from seeclip.datasets.manifest import (
    CorruptImagesError,
    Manifest,
    default_manifest_path,
    find_corrupt,
    load_manifest,
    prepare,
)
from seeclip.datasets.specs import (
    BENCHMARKS,
    PACKAGED_SPECS,
    BenchmarkEntry,
    BenchmarkSpec,
    ProtocolSpec,
    get_benchmark,
    load_folder_spec,
    load_spec,
    spec_from_dict,
)
from seeclip.datasets.split_data import SplitData, select, source_val_mask
from seeclip.datasets.splits import OSDGSplit, make_split

__all__ = [
    "BENCHMARKS",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "PACKAGED_SPECS",
    "SPLITS",
    "BenchmarkEntry",
    "BenchmarkSpec",
    "CorruptImagesError",
    "DataLayoutError",
    "Manifest",
    "OSDGSplit",
    "ProtocolSpec",
    "Sample",
    "SplitData",
    "default_manifest_path",
    "describe_benchmark",
    "expected_layout",
    "find_corrupt",
    "get_benchmark",
    "load_folder_spec",
    "load_manifest",
    "load_samples",
    "load_spec",
    "make_split",
    "prepare",
    "select",
    "source_val_mask",
    "spec_from_dict",
]
