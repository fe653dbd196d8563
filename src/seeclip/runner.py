"""The run lifecycle: one evaluation run, top to bottom, and its folder.

A run reads its data (:mod:`seeclip.run_data`), gets its method wired from the config
(:mod:`seeclip.wiring`), fits on the sources, predicts the target and writes its folder
``runs/<name>/<config-hash>/`` (:func:`seeclip.records.run_folder`): ``config.yaml``,
``results.jsonl`` (:mod:`seeclip.records`: one final record and one record per epoch),
``predictions.npz`` (everything needed to recompute the metrics), ``model.safetensors`` and a
``done`` marker written last. A folder with ``done`` is complete and is reused.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from seeclip import distributed, metrics
from seeclip.config import to_dict
from seeclip.datasets.digits import installed_versions
from seeclip.features import Features, ModelFollowingSource, Prediction, PseudoUnknownSource
from seeclip.io import atomic_path, load_tensors, write_text
from seeclip.methods import Method
from seeclip.methods.registry import METHODS
from seeclip.pseudo import draw
from seeclip.records import FINAL, final_record, write_records
from seeclip.run_config import RunConfig, load_config, save_config
from seeclip.run_data import RunData, check_same_data, load_run_data
from seeclip.wiring import check_inputs, make_method, pseudo_sources

# the install a record names: what computes features, trains and scores
RECORD_PACKAGES = ("seeclip", "torch", "open_clip_torch", "numpy", "scikit-learn", "pillow")


TRAIN_STATE = "train_state.pt"  # an unfinished run's training checkpoint (resumed from)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    record: dict
    cached: bool  # True when a finished run folder was reused


def run_eval(
    cfg: RunConfig,
    *,
    runs_dir: str | Path = "runs",
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    checkpoint_every: int = 1,
) -> RunResult:
    """Fit ``cfg.method`` on the sources, evaluate it on ``cfg.data.target``, write the run.

    Training writes ``train_state.pt`` in the run folder every ``checkpoint_every`` epochs
    (0: never); an unfinished run with one resumes from it, and it is deleted once the run is
    done. ``force`` starts afresh."""
    run_dir = cfg.run_dir(runs_dir)
    ckpt = run_dir / TRAIN_STATE
    if force:
        ckpt.unlink(missing_ok=True)
    if (run_dir / "done").exists() and not force:
        record = final_record(run_dir)
        if record is not None:
            check_same_data(cfg, record, run_dir)
            return RunResult(run_dir, record, cached=True)
    METHODS.get(cfg.method)  # fail on a bad method name before any work
    check_inputs(cfg)  # and on a missing generator, before any data is read or folder made
    set_seed(cfg.seed)
    run = load_run_data(cfg, cache_dir=cache_dir, progress=progress)
    pseudo = pseudo_sources(cfg, run, cache_dir=cache_dir, progress=progress)
    method = make_method(cfg, run, cache_dir=cache_dir, progress=progress, pseudo=pseudo)
    data = run.data
    main = distributed.is_main()  # under torchrun only rank 0 writes and evaluates
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "done").unlink(missing_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    distributed.barrier()
    start = time.perf_counter()
    method.fit(
        run.features(data.source_train),
        torch.as_tensor(data.source_train_labels),
        run.features(data.source_val),
        torch.as_tensor(data.source_val_labels),
        checkpoint=ckpt if checkpoint_every > 0 else None,
        checkpoint_every=checkpoint_every,
    )
    fit_seconds = time.perf_counter() - start
    if not main:
        distributed.barrier()  # rank 0 evaluates and writes the run
        return RunResult(run_dir, {}, cached=False)
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file(method.state(), str(tmp))
    epochs = [{**r, "config_hash": cfg.hash(), "seed": cfg.seed} for r in method.history()]
    chosen = [r["epoch"] for r in epochs if r.get("selected")]
    trained = {"selection": cfg.train.selection, "selected_epoch": chosen[0]} if epochs else {}
    extra = {"selection": None, "selected_epoch": None, **trained}
    extra["fit_seconds"] = round(fit_seconds, 3)
    # where it trained: not part of the config (a run's hash), but its float rounding differs
    extra["device"] = str(distributed.device())
    extra["processes"] = distributed.world_size()
    source = pseudo.built("train")
    if isinstance(source, ModelFollowingSource):  # what the online generator cost the run
        extra["pseudo_images_drawn"] = source.images_drawn
    pseudo_scores = pseudo_unknown_scores(method, source, run.split.source_domains)
    record = _evaluate(
        cfg, run, method, run_dir, epochs=epochs, extra=extra, pseudo_scores=pseudo_scores
    )
    ckpt.unlink(missing_ok=True)  # the run is done: model.safetensors holds what it learned
    distributed.barrier()
    return RunResult(run_dir, record, cached=False)


PSEUDO_SCORED = 200  # pseudo-unknowns per source domain whose unknown score a run saves
ONLINE_SCORED = 8  # the same for the online generator (each one is a text-to-image sample)


def pseudo_unknown_scores(
    method: Method, source: PseudoUnknownSource | None, domains: tuple[str, ...]
) -> np.ndarray | None:
    """The trained method's unknown score on fresh draws of the pseudo-unknowns it trained
    with (:data:`PSEUDO_SCORED` per source domain, a fixed generator apart from training's);
    None for a method that drew none. For the report's score histograms. The online generator
    draws :data:`ONLINE_SCORED` per domain from the trained model's queries."""
    if source is None:
        return None
    gen = torch.Generator().manual_seed(0)
    n = PSEUDO_SCORED
    if isinstance(source, ModelFollowingSource):
        n = ONLINE_SCORED
        source.prepare(0, {d: n for d in sorted(set(domains))}, gen)
    g, t = draw(source, domains, n, gen)
    return method.predict(Features(g, t, ("pseudo-unknown",) * g.shape[0])).unknown_score


def eval_run(
    run_dir: str | Path, *, cache_dir: str | Path | None = None, progress: bool = True
) -> RunResult:
    """Re-evaluate a trained run from its checkpoint; the new record replaces the old one."""
    run_dir = Path(run_dir)
    cfg, run, method = restore_run(run_dir, cache_dir=cache_dir, progress=progress)
    old = final_record(run_dir) or {}
    (run_dir / "done").unlink(missing_ok=True)
    extra = {
        k: old.get(k) for k in ("selection", "selected_epoch", "fit_seconds", "device", "processes")
    }
    extra["evaluations"] = int(old.get("evaluations", 1)) + 1
    record = _evaluate(cfg, run, method, run_dir, epochs=None, extra=extra)
    return RunResult(run_dir, record, cached=False)


def restore_run(
    run_dir: Path, *, cache_dir: str | Path | None = None, progress: bool = True
) -> tuple[RunConfig, RunData, Method]:
    """(config, run data, fitted method) of a run folder, from its config and checkpoint."""
    cfg = run_config(run_dir)
    run = load_run_data(cfg, cache_dir=cache_dir, progress=progress)
    method = make_method(cfg, run, cache_dir=cache_dir, progress=progress)
    state = load_tensors(run_dir / "model.safetensors")
    try:
        method.load_state(state)
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"{run_dir}/model.safetensors does not fit its config: {err}") from err
    return cfg, run, method


def run_config(run_dir: Path) -> RunConfig:
    """The config of a trained run folder, checked against the folder's name."""
    for name in ("config.yaml", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir} is not a run folder: {name} is missing "
                f"(expected runs/<name>/<config-hash>/ written by `seeclip train` or `eval`)"
            )
    cfg = load_config(run_dir / "config.yaml")
    if cfg.hash() != run_dir.name:
        raise ValueError(
            f"{run_dir}/config.yaml hashes to {cfg.hash()}, not to the folder name: it was edited "
            f"after training; train a new run instead"
        )
    return cfg


def _evaluate(
    cfg: RunConfig,
    run: RunData,
    method: Method,
    run_dir: Path,
    *,
    epochs: list[dict] | None,
    extra: dict,
    pseudo_scores: np.ndarray | None = None,
) -> dict:
    """Predict the target (no label goes in), score it, write predictions and records.

    ``pseudo_scores``: unknown scores of pseudo-unknowns (saved as ``pseudo_unknown_score``);
    a re-evaluation keeps the ones the run saved when it trained."""
    split, data = run.split, run.data
    target = run.features(data.target)
    pred: Prediction = method.predict(target)  # no label goes in
    y_true = np.asarray(data.target_labels)
    target_classes = [run.classes[i] for i in data.target]
    num_known = len(split.known)
    record = {
        "kind": FINAL,
        "benchmark": run.spec.name,
        "protocol": split.protocol,
        "target": split.target,
        "method": cfg.label or cfg.method,
        "seed": cfg.seed,
        "backbone": run.backbone.name,
        "pretrained": run.backbone.pretrained,
        "backbone_fingerprint": run.backbone.fingerprint,  # which weights (cache key's sha256)
        "n_known": int((y_true >= 0).sum()),
        "n_unknown": int((y_true < 0).sum()),
        **metrics.open_set_report(
            y_true, pred.y_pred, pred.y_pred_closed, pred.unknown_score, num_known=num_known
        ),
        # AccU on hard and easy unknowns, where the benchmark names look-alikes (glyphs)
        **metrics.acc_unknown_by_group(
            pred.y_pred,
            target_classes,
            run.spec.unknown_kinds(split.protocol),
            num_known=num_known,
        ),
        # what predict needs to rebuild the method without re-reading the benchmark's files
        "classes": {
            "known": list(split.known),
            "texts": list(run.class_texts),
            "template": run.spec.template,
            "sources": list(split.source_domains),
        },
        "data_hash": run.data_hash,
        "data_hash_kind": run.data_hash_kind,
        "install": installed_versions(RECORD_PACKAGES),
        **extra,
        "config_hash": cfg.hash(),
        "setting_hash": cfg.setting_hash(),
        "config": to_dict(cfg),
    }
    record = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in record.items()}
    if pseudo_scores is None and epochs is None:  # re-evaluation: keep what training saved
        pseudo_scores = _saved_pseudo_scores(run_dir)
    _write_predictions(
        run_dir, pred, y_true, target.domains, target_classes, split.known, pseudo_scores
    )
    write_records(run_dir, record, epochs)
    write_text(run_dir / "done", time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return record


def _saved_pseudo_scores(run_dir: Path) -> np.ndarray | None:
    path = run_dir / "predictions.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        return z["pseudo_unknown_score"] if "pseudo_unknown_score" in z.files else None


def _write_predictions(
    run_dir: Path, pred: Prediction, y_true, domains, classes, known, pseudo_scores=None
) -> None:
    extra = {} if pseudo_scores is None else {"pseudo_unknown_score": pseudo_scores}
    with atomic_path(run_dir / "predictions.npz") as tmp:
        np.savez(
            tmp,
            **extra,
            y_true=y_true.astype(np.int64),
            y_pred=pred.y_pred.astype(np.int64),
            y_pred_closed=pred.y_pred_closed.astype(np.int64),
            unknown_score=pred.unknown_score.astype(np.float64),
            domain=np.asarray(domains),
            target_class=np.asarray(classes),  # the true class name (unknowns keep theirs)
            known_classes=np.asarray(known),
        )
