"""``seeclip generate``: build a pseudo-unknown pool for one run config, and inspect it.

Both backends start from the SOURCE training features of the config's split (never the target):
``feature`` trains the feature-space diffusion generator and samples its pool (what
``train.pseudo_unknowns=diffusion`` uses); ``image`` runs Stable Diffusion on the perturbed
semantic tokens of source images and writes an image pool that ``train.pseudo_unknowns=images``
reads through the feature cache. ``--inspect`` plots how close each group is to the known
classes' text prototypes; target labels only split the plot's groups.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="build (and inspect) a pseudo-unknown pool for a config")
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/digits.yaml")
    p.add_argument("--target", help="target domain (the pool uses only its source domains)")
    p.add_argument("--protocol", help="split family: full | daml")
    p.add_argument("--backend", choices=["feature", "image"], default="feature")
    p.add_argument("--n", type=int, help="pseudo-unknowns per source domain")
    p.add_argument("--seed", type=int, help="generation seed (default: the config's)")
    p.add_argument("--data-root")
    p.add_argument(
        "--from",
        dest="source_split",
        choices=["train", "val"],
        default="train",
        help="build the pool from source training images (default) or from source-validation "
        "images only (a held-out pool for train.selection=val_h: train.val_pseudo_pool=...)",
    )
    p.add_argument("--inspect", action="store_true", help="similarity histograms + rejection rate")
    p.add_argument("--run", help="inspect: rejection rate of this trained run (default: zeroshot)")
    p.add_argument(
        "--sd-model",
        help="image: text-to-image model: a shipped name (tiny-glyphs-sd), a diffusers folder or "
        "a cached repo id (default: train.sd_model)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--out",
        help="image: pool folder (default: the cache folder that training with the same "
        "settings reads, <cache root>/pools/images/sd-<hash>)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="image: replace a pool of other settings in --out (default: stop with an error)",
    )
    p.add_argument(
        "--cache-dir",
        help="root of the feature cache and pseudo-unknown pools (default: $SEECLIP_HOME)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. diffusion.sigma=0.3")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from seeclip.run_config import load_config

    flags = {"data.protocol": args.protocol, "data.data_root": args.data_root}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    if args.target:
        overrides.append(f"data.target={args.target}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.n is not None:
        overrides.append(f"diffusion.pool_per_domain={args.n}")
    if getattr(args, "sd_model", None):
        overrides.append(f"train.sd_model={args.sd_model}")
    cfg = load_config(args.config, overrides)
    if not cfg.data.target:
        raise ValueError("generate needs one target domain: pass --target T")
    return cfg


def run(args: argparse.Namespace) -> int:
    from seeclip.run_data import load_run_data
    from seeclip.runner import set_seed
    from seeclip.wiring import pseudo_context

    cfg = _config(args)
    set_seed(cfg.seed)
    progress = not args.no_progress
    loaded = load_run_data(cfg, cache_dir=args.cache_dir, progress=progress)
    data = loaded.data
    if args.source_split == "val":
        rows_of_split, split_labels = data.source_val, data.source_val_labels
    else:
        rows_of_split, split_labels = data.source_train, data.source_train_labels
    # the context training builds its source from: same features, settings and seed
    ctx = pseudo_context(
        cfg, loaded, rows_of_split, split_labels, cache_dir=args.cache_dir, progress=progress
    )
    if args.backend == "feature":
        from seeclip.pseudo import diffusion_unknowns

        pool = diffusion_unknowns(ctx)
        counts = {d: int(len(pool.rows(d))) for d in sorted(set(pool.domains))}
        print(f"feature pool: {len(pool)} pseudo-unknowns {counts} -> {pool.path}")
        print(f"train with it: {_train_command(args, cfg, 'pool', pool.path)}")
        pool_feats = pool.features()
    else:
        from seeclip.generate.image_pool import load_image_pool
        from seeclip.pseudo import image_pool_features
        from seeclip.pseudo.sd_images import write_sd_pool

        overwrite = args.overwrite or args.out is None  # the cache folder is seeclip's own
        manifest = write_sd_pool(ctx, out_dir=args.out, device=args.device, overwrite=overwrite)
        print(f"image pool: {len(load_image_pool(manifest).paths)} images -> {manifest}")
        print(f"train with it: {_train_command(args, cfg, 'images', manifest)}")
        pool_feats = image_pool_features(
            loaded.backbone, manifest, cache_dir=args.cache_dir, progress=progress
        )
    if args.inspect:
        _inspect(args, cfg, loaded, loaded.class_texts, pool_feats, progress)
    return 0


def _train_command(args: argparse.Namespace, cfg, source: str, pool) -> str:
    """The `seeclip train` line that uses this pool: the same config, target and overrides."""
    import shlex

    parts = ["seeclip", "train", "--config", args.config, "--target", cfg.data.target]
    if args.protocol:
        parts += ["--protocol", args.protocol]
    if args.data_root:
        parts += ["--data-root", args.data_root]
    if args.seed is not None:
        parts += ["--seed", str(args.seed)]
    keep = [
        o
        for o in args.overrides
        if not o.startswith(
            ("train.pseudo_unknowns=", "train.pseudo_pool=", "train.val_pseudo_pool=")
        )
    ]
    parts += [*keep, f"train.pseudo_unknowns={source}", f"train.{_pool_key(args)}={pool}"]
    return shlex.join(str(p) for p in parts)


def _pool_key(args: argparse.Namespace) -> str:
    return "val_pseudo_pool" if args.source_split == "val" else "pseudo_pool"


def _inspect(args, cfg, loaded, class_texts, pool_feats, progress) -> None:
    from seeclip.generate.inspect import rejection_rate, similarity_report
    from seeclip.runner import restore_run
    from seeclip.wiring import make_method

    data = loaded.data
    target = loaded.features(data.target)
    y = np.asarray(data.target_labels)  # only to split the plot's groups; no selection uses it
    groups = {
        "known (target)": target.global_[torch.as_tensor(y >= 0)],
        "unknown (target)": target.global_[torch.as_tensor(y < 0)],
        "pseudo-unknown": pool_feats.global_,
    }
    d = cfg.data
    out_png = Path(args.run or ".") / f"pseudo_unknowns_{d.benchmark}_{d.protocol}_{d.target}.png"
    report = similarity_report(
        loaded.backbone, class_texts, loaded.spec.template, groups, out_png=out_png
    )
    print(f"max cosine to a known-class text prototype -> {report['png']}")
    for name, stats in report["groups"].items():
        print(
            f"  {name:<18} n={stats['n']:<5} mean {stats['mean']:.3f}  "
            f"q05 {stats['q05']:.3f}  q50 {stats['q50']:.3f}  q95 {stats['q95']:.3f}"
        )
    if args.run:
        _, _, method = restore_run(Path(args.run), cache_dir=args.cache_dir, progress=progress)
        who = f"run {args.run}"
    else:
        zs = dataclasses.replace(cfg, method="zeroshot")
        method = make_method(zs, loaded, cache_dir=args.cache_dir, progress=progress)
        method.fit(None, None, loaded.features(data.source_val), None)
        who = "zero-shot CLIP (source-val threshold)"
    print(f"{who} already rejects {rejection_rate(method, pool_feats):.1%} of the pool")
