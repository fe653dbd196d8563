"""A trained run applied to new images: ``seeclip.load(run_dir).predict(images)``.

The run's own config and checkpoint rebuild the method on its frozen backbone; images go
through the backbone's preprocessing and are encoded exactly as the feature cache encodes them
(same batch size, float16), so predicting a finished run's target images reproduces its
``predictions.npz``. Nothing of the benchmark's data is read: only its class names.

A file that cannot be read gives a row with ``error`` set and does not stop the batch.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seeclip import distributed
from seeclip.datasets import get_benchmark, make_split
from seeclip.datasets.images import IMAGE_EXTENSIONS, ImageReadError, load_image, to_rgb
from seeclip.features import Features, PseudoSources
from seeclip.io import load_tensors
from seeclip.methods import Method
from seeclip.records import final_record
from seeclip.run_config import RunConfig
from seeclip.run_data import BACKBONES, default_data_root
from seeclip.runner import run_config
from seeclip.wiring import method_for

UNKNOWN = "unknown"


@dataclass(frozen=True)
class ImagePrediction:
    """One image's answer: a known class name or ``unknown``."""

    source: str  # the path, or "<image i>" for an in-memory image
    label: str | None  # class name or "unknown"; None when the image could not be read
    confidence: float | None  # 1 - unknown score: how sure the method is the image is known
    unknown_score: float | None  # higher = more likely unknown (the run's own score)
    closed_label: str | None  # the best known class, ignoring "unknown"
    error: str | None = None


def _no_pseudo() -> None:
    raise RuntimeError("a loaded run predicts; it does not train on pseudo-unknowns")


class Predictor:
    """A fitted run: its config, known classes, backbone and method."""

    def __init__(
        self, run_dir: Path, cfg: RunConfig, known: tuple[str, ...], method: Method, backbone
    ) -> None:
        self.run_dir, self.cfg, self.known = run_dir, cfg, known
        self.method, self.backbone = method, backbone

    def __repr__(self) -> str:
        return (
            f"Predictor({self.run_dir}, method={self.cfg.label or self.cfg.method}, "
            f"{len(self.known)} known classes)"
        )

    def predict(
        self, images: Iterable[Image.Image | torch.Tensor | str | Path]
    ) -> list[ImagePrediction]:
        """Predict PIL images, image tensors ([3, H, W] or [N, 3, H, W], values in [0, 1]) or
        paths (files; use :func:`expand_paths` for folders). Order is kept."""
        items: list[tuple[str, Image.Image | None, str | None]] = []
        for i, img in enumerate(images):
            items.extend(self._as_pil(i, img))
        ok = [(k, pil) for k, (_, pil, err) in enumerate(items) if err is None]
        results: dict[int, ImagePrediction] = {}
        batch = self.cfg.encode_batch_size
        with torch.inference_mode(), distributed.placed(self.backbone):
            gs, ts = [], []
            for start in range(0, len(ok), batch):  # batches as the feature cache builds them
                x = torch.stack([self.backbone.preprocess(p) for _, p in ok[start : start + batch]])
                g, t = self.backbone.encode_image(x)
                gs.append(g.float().cpu().numpy().astype(np.float16))
                ts.append(t.float().cpu().numpy().astype(np.float16))
        if ok:
            g, t = torch.from_numpy(np.concatenate(gs)), torch.from_numpy(np.concatenate(ts))
            pred = self.method.predict(Features(g, t, ("new",) * len(ok)))  # no label goes in
            names = (*self.known, UNKNOWN)
            for j, (k, _) in enumerate(ok):
                score = float(pred.unknown_score[j])
                results[k] = ImagePrediction(
                    items[k][0],
                    names[int(pred.y_pred[j])],
                    1.0 - score,
                    score,
                    self.known[int(pred.y_pred_closed[j])],
                )
        return [
            results.get(k) or ImagePrediction(src, None, None, None, None, err)
            for k, (src, _, err) in enumerate(items)
        ]

    @staticmethod
    def _as_pil(i: int, img) -> list[tuple[str, Image.Image | None, str | None]]:
        if isinstance(img, str | Path):
            try:
                return [(str(img), load_image(Path(img)), None)]
            except ImageReadError as err:  # the decoder's own words, not prepare's advice
                return [(str(img), None, f"cannot read image: {err.__cause__ or err}")]
        if isinstance(img, Image.Image):
            return [(f"<image {i}>", to_rgb(img), None)]
        if isinstance(img, torch.Tensor):
            batch = img if img.ndim == 4 else img.unsqueeze(0)
            if batch.ndim != 4 or batch.shape[1] not in (1, 3):
                raise ValueError(
                    f"image tensors are [3, H, W] or [N, 3, H, W] in [0, 1], got "
                    f"shape {tuple(img.shape)}"
                )
            # rounded, not truncated: a tensor made from 8-bit pixels gives those pixels back
            u8 = (batch.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            u8 = u8.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
            return [
                (f"<image {i}.{j}>" if img.ndim == 4 else f"<image {i}>", Image.fromarray(x), None)
                for j, x in enumerate(u8)
            ]
        raise TypeError(f"cannot predict a {type(img).__name__}: pass PIL images, tensors or paths")


def load(run_dir: str | Path) -> Predictor:
    """A finished run folder, ready to predict new images. A run without its ``done`` marker or
    with weights that are not all finite is refused: it would serve wrong answers."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if not (run_dir / "done").is_file():
        raise ValueError(
            f"{run_dir} is not a finished run (no done marker): finish it with the command that "
            f"made it (it resumes), or pass a finished run"
        )
    facts = (final_record(run_dir) or {}).get("classes")
    if facts:  # the run's own class names and prompts: an edited or moved spec changes nothing
        known, texts, template = tuple(facts["known"]), tuple(facts["texts"]), facts["template"]
    else:  # a run recorded before runs kept them: read the benchmark's spec
        d = cfg.data
        root = Path(d.data_root) if d.data_root else default_data_root(d.benchmark)
        spec = get_benchmark(d.benchmark, classes_file=d.classes_file, data_root=root)
        known = tuple(make_split(spec, d.protocol, d.target).known)
        texts, template = tuple(spec.class_text(c) for c in known), spec.template
    backbone = BACKBONES.get(cfg.backbone.name, cfg.backbone.pretrained)
    pseudo = PseudoSources("none", _no_pseudo, _no_pseudo)
    method = method_for(cfg, backbone, texts, template, pseudo=pseudo, progress=False)
    state = load_tensors(run_dir / "model.safetensors")
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all())
    if bad:
        raise ValueError(
            f"{run_dir}/model.safetensors holds non-finite values ({', '.join(bad[:3])}): the "
            f"training diverged; rerun it with --force and a smaller train.lr"
        )
    try:
        method.load_state(state)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"{run_dir}/model.safetensors does not fit its config: {err}") from err
    return Predictor(run_dir, cfg, known, method, backbone)


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (recursively, sorted); a missing path is
    kept so that its row reports the error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(
                sorted(
                    f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                )
            )
        else:
            out.append(p)
    return out


CSV_FIELDS = ("path", "prediction", "confidence", "unknown_score", "closed_prediction", "error")


def to_csv(rows: Sequence[ImagePrediction]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in rows:
        w.writerow(
            [
                r.source,
                r.label or "",
                "" if r.confidence is None else f"{r.confidence:.6f}",
                "" if r.unknown_score is None else f"{r.unknown_score:.6f}",
                r.closed_label or "",
                r.error or "",
            ]
        )
    return buf.getvalue()
