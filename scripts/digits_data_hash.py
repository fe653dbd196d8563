"""Print the content hash of the embedded digits benchmark (and a corpus prefix) on this install.

The hashes in docs/results.md come from this script. Run it under another install to check
that the generated images are byte-identical there, e.g. with older rendering packages put in
front of the environment's own (no change to the environment itself):

    pip install --no-deps --target /tmp/old pillow==10.4.0 matplotlib==3.8.4 scikit-image==0.23.2
    PYTHONPATH=/tmp/old python scripts/digits_data_hash.py

    python scripts/digits_data_hash.py [--n-per-class 200] [--corpus 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from seeclip.datasets.digits import generate_benchmark, generate_corpus, read_meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-per-class", type=int, default=200, help="benchmark images per class")
    p.add_argument("--corpus", type=int, default=2000, help="corpus images (0: skip)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench = generate_benchmark(Path(tmp) / "b", n_per_class=args.n_per_class, progress=False)
        meta = read_meta(bench)
        out = {"benchmark": meta["content_hash"], "renderer": meta["renderer"]}
        if args.corpus:
            corpus = generate_corpus(Path(tmp) / "c", n=args.corpus, progress=False)
            out["corpus"] = read_meta(corpus)["content_hash"]
        out["install"] = meta["install"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
