"""The quality bars of tiny-glyphs-sd (docs/pseudo_unknowns.md), measured with tiny-glyphs.

1. Prompted with a class name ("a printed letter q"), how many samples are that class, judged by
   tiny-glyphs (24-way zero-shot over the benchmark classes) and by an independent judge: a
   small CNN trained here on real corpus glyphs (all 58 concepts; its accuracy on the real,
   held-out-font benchmark images is printed next to it).
2. Prompted as SeeCLIP prompts it (semantic tokens of source images, perturbed by sigma and
   projected into the text conditioning; the preset's positive prompt; the known class names as
   the negative prompt; guidance g), how many samples fall outside the 12 known classes (the
   judge's 58-way call) and whether they are near misses: how often their nearest known class
   (tiny-glyphs, 12-way) is the class of the source image they were made from, against chance
   (1/12), and, for samples the judge calls a hard unknown, how often it is that unknown's
   look-alike. A histogram of the tiny-glyphs known-class score (max softmax over the 12 known
   classes) of the samples against real known and real unknown images, and sample grids, go to
   docs/img/.

The judges' accuracy on real benchmark images passed through the model's VAE (encode, decode)
is printed too: it bounds what any UNet on that VAE can reach on bar 1.

    python scripts/tiny_glyphs_sd_quality.py [--sd-model tiny-glyphs-sd] [--target handwritten]
        [--projection random|text_inverse] [--guidance G] [--class-guidance G]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from seeclip.backbone import build_backbone
from seeclip.datasets import get_benchmark
from seeclip.datasets.glyphs import CONCEPTS
from seeclip.generate.denoiser import semantic_queries, semantic_summaries
from seeclip.generate.image_pool import generate_image_pool, load_image_pool
from seeclip.generate.sd_conditioning import conditioning_projection
from seeclip.generate.sd_pipeline import ImageDiffusionConfig, load_pipeline
from seeclip.paths import seeclip_home
from seeclip.pseudo.sd_images import pick_sources
from seeclip.run_config import load_config
from seeclip.zoo.pretrain import default_config, load_benchmark_arrays, to_input

ROOT = Path(__file__).parents[1]
IMG = ROOT / "docs" / "img"
NAMES = list(CONCEPTS)
ADJ = {
    "printed": "printed",
    "outline": "outline",
    "textured": "textured",
    "handwritten": "handwritten",
}


class Judge(nn.Module):
    """A small CNN over 48 px glyphs, 58-way (every concept of the world)."""

    def __init__(self) -> None:
        super().__init__()

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.body = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), block(128, 128))
        self.head = nn.Linear(128 * 9, len(NAMES))

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def train_judge(steps: int = 1200, batch: int = 128) -> Judge:
    """Train the judge on the first 60k corpus pairs (cached under $SEECLIP_HOME/judges)."""
    cached = seeclip_home() / "judges" / f"glyphs-cnn-{steps}x{batch}.pt"
    judge = Judge()
    if cached.is_file():
        judge.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
        return judge.eval()
    corpus = seeclip_home() / "data" / "glyphs_corpus"
    images = torch.from_numpy(np.load(corpus / "images.npy", mmap_mode="r")[:60000].copy())
    labels = torch.from_numpy(np.load(corpus / "labels.npy")[:60000])
    torch.manual_seed(0)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    judge.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        loss = F.cross_entropy(judge(to_input(images[idx])), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(judge.state_dict(), cached)
    return judge.eval()


@torch.no_grad()
def judge_predict(judge: Judge, images: np.ndarray) -> np.ndarray:
    out = [judge(to_input(images[i : i + 256])).argmax(-1) for i in range(0, len(images), 256)]
    return torch.cat(out).numpy()


@torch.no_grad()
def clip_probs(backbone, images: np.ndarray, texts: list[str], templates) -> np.ndarray:
    """Softmax over ``texts`` (template-ensemble classifier) at the model's logit scale."""
    import open_clip

    w = open_clip.build_zero_shot_classifier(
        backbone.model, backbone.tokenizer, texts, list(templates)
    )
    out = []
    for i in range(0, len(images), 256):
        g, _ = backbone.encode_image(to_input(images[i : i + 256]))
        out.append((backbone.logit_scale * g @ w).softmax(-1))
    return torch.cat(out).numpy()


def sample(pipe, prompts: list[str], *, seed: int, steps: int, guidance: float) -> np.ndarray:
    images = []
    for i in range(0, len(prompts), 32):
        gens = [
            torch.Generator().manual_seed(seed + j) for j in range(i, min(i + 32, len(prompts)))
        ]
        out = pipe(
            prompts[i : i + 32],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
        ).images
        images.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images)


def save_grid(images: np.ndarray, path: Path, cols: int) -> None:
    n, s = len(images), images.shape[1]
    rows = -(-n // cols)
    pad = np.full((rows * cols - n, s, s, 3), 255, dtype=np.uint8)
    grid = np.concatenate([images, pad]).reshape(rows, cols, s, s, 3)
    Image.fromarray(grid.transpose(0, 2, 1, 3, 4).reshape(rows * s, cols * s, 3)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd-model", default="tiny-glyphs-sd")
    parser.add_argument("--target", default="handwritten", help="its domain is left out")
    parser.add_argument("--per-class", type=int, default=8, help="class-prompted samples")
    parser.add_argument("--per-domain", type=int, default=64, help="SeeCLIP-prompted samples")
    parser.add_argument("--class-guidance", type=float, default=4.0)
    parser.add_argument("--guidance", type=float, help="SeeCLIP-prompted g (default: preset's)")
    parser.add_argument(
        "--prompt",
        help="SeeCLIP-prompted positive prompt with {domain} "
        "(default: the preset's train.sd_prompt)",
    )
    parser.add_argument(
        "--projection",
        choices=("random", "text_inverse"),
        help="tokens -> text conditioning (default: the preset's)",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="SeeCLIP-prompted: 1 = from noise (the paper's); below 1 = SDEdit "
        "from each sample's source image",
    )
    parser.add_argument("--skip-class-prompts", action="store_true", help="only part 2")
    parser.add_argument("--no-images", action="store_true", help="do not write docs/img/")
    parser.add_argument("--judge-only", action="store_true", help="train and cache the judge")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.judge_only:
        train_judge()
        return
    spec = get_benchmark("glyphs")
    preset = load_config(ROOT / "configs" / "glyphs.yaml")
    templates = default_config("glyphs").eval_templates
    clip = build_backbone("tiny-glyphs")
    pipe = load_pipeline(args.sd_model)
    report: dict = {"sd_model": args.sd_model}

    judge = train_judge()
    bench = load_benchmark_arrays(n_per_class=100, limit_per_class=20, world="glyphs")
    real = np.concatenate([x for x, _ in bench.values()])
    real_y = np.concatenate([y for _, y in bench.values()])
    concept_of = np.array([NAMES.index(c) for c in spec.classes])
    report["judge_accuracy_on_real_benchmark"] = float(
        (judge_predict(judge, real) == concept_of[real_y]).mean()
    )
    texts = [spec.class_text(c) for c in spec.classes]
    with torch.no_grad():  # the VAE's ceiling: real images through encode -> decode
        x = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        rec = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    report["vae_reconstructions"] = {
        "judge_accuracy": float((judge_predict(judge, rec) == concept_of[real_y]).mean()),
        "tiny_glyphs_accuracy": float(
            (clip_probs(clip, rec, texts, templates).argmax(-1) == real_y).mean()
        ),
        "tiny_glyphs_accuracy_on_originals": float(
            (clip_probs(clip, real, texts, templates).argmax(-1) == real_y).mean()
        ),
    }

    # 1. class-prompted
    domains = spec.domains
    if not args.skip_class_prompts:
        prompts, want = [], []
        for c, name in enumerate(spec.classes):
            for j in range(args.per_class):
                prompts.append(f"a {ADJ[domains[j % len(domains)]]} {spec.class_text(name)}")
                want.append(c)
        want = np.array(want)
        images = sample(pipe, prompts, seed=0, steps=20, guidance=args.class_guidance)
        by_clip = clip_probs(clip, images, texts, templates).argmax(-1)
        by_judge = judge_predict(judge, images)
        report["class_prompted"] = {
            "n": len(images),
            "guidance": args.class_guidance,
            "steps": 20,
            "tiny_glyphs_agrees": float((by_clip == want).mean()),
            "judge_agrees": float((by_judge == concept_of[want]).mean()),
            "chance_tiny_glyphs": 1 / len(texts),
            "chance_judge": 1 / len(NAMES),
        }
        first4 = images.reshape(len(spec.classes), args.per_class, 48, 48, 3)[:, :4]
        if not args.no_images:
            save_grid(first4.reshape(-1, 48, 48, 3), IMG / "glyphs_sd_class_prompts.png", cols=16)

    # 2. SeeCLIP-prompted: sources of one leave-one-domain-out split, the preset's settings
    known = spec.protocols["full"].known
    sources = [d for d in domains if d != args.target]
    src = load_benchmark_arrays(n_per_class=100, world="glyphs")
    imgs, labels, doms = [], [], []
    for d in sources:
        x, y = src[d]
        keep = np.isin(np.array(spec.classes)[y], known)
        imgs.append(x[keep][::4])
        labels.append(np.array([known.index(spec.classes[i]) for i in y[keep][::4]]))
        doms += [d] * len(labels[-1])
    imgs, labels = np.concatenate(imgs), np.concatenate(labels)
    with torch.no_grad():
        tokens = torch.cat(
            [clip.encode_image(to_input(imgs[i : i + 256]))[1] for i in range(0, len(imgs), 256)]
        )
    gen = torch.Generator().manual_seed(0)
    rows = pick_sources(tuple(doms), args.per_domain, gen)
    queries = semantic_queries(tokens, preset.diffusion.k, gen)
    summaries = semantic_summaries(tokens[rows], queries)
    guidance = preset.diffusion.guidance if args.guidance is None else args.guidance
    projection = args.projection or preset.train.sd_projection
    icfg = ImageDiffusionConfig(
        model=args.sd_model,
        prompt=args.prompt or preset.train.sd_prompt,
        sigma=preset.diffusion.sigma,
        guidance=guidance,
        batch_size=32,
        projection=projection,
        strength=args.strength,
    )
    known_texts = [spec.class_text(c) for c in known]
    tag = hashlib.sha1(json.dumps([args.sd_model, str(icfg)]).encode()).hexdigest()[:10]
    out = seeclip_home() / "pools" / "images" / f"quality-{args.target}-{tag}"  # per setting
    manifest = generate_image_pool(
        pipe,
        summaries,
        [doms[i] for i in rows],
        [f"{doms[i]}:{i}" for i in rows],
        known_texts,
        out_dir=out,
        cfg=icfg,
        seed=0,
        overwrite=True,
        progress=True,
        projection=conditioning_projection(icfg, pipe, clip),
        init_images=[imgs[i] for i in rows],
    )
    pool = load_image_pool(manifest)
    gen_images = np.stack(
        [np.asarray(Image.open(pool.root / p).convert("RGB")) for p in pool.paths]
    )
    source_class = labels[rows]
    judged = judge_predict(judge, gen_images)
    known_concepts = {NAMES.index(c) for c in known}
    outside = np.array([j not in known_concepts for j in judged])
    nearest = clip_probs(clip, gen_images, known_texts, templates).argmax(-1)
    hard = {NAMES.index(h): known.index(k) for h, k in spec.lookalikes.items()}
    is_hard = np.array([j in hard for j in judged])
    lookalike_hits = [nearest[i] == hard[judged[i]] for i in np.flatnonzero(is_hard)]
    report["seeclip_prompted"] = {
        "n": len(gen_images),
        "target_left_out": args.target,
        "prompt": icfg.prompt,
        "negative_prompt": ", ".join(known_texts),
        "sigma": icfg.sigma,
        "guidance": icfg.guidance,
        "steps": icfg.steps,
        "projection": icfg.projection,
        "strength": icfg.strength,
        "outside_known_by_judge": float(outside.mean()),
        "judged_hard_unknown": float(is_hard.mean()),
        "nearest_known_is_source_class": float((nearest == source_class).mean()),
        "nearest_known_is_lookalike_of_judged_hard": (
            float(np.mean(lookalike_hits)) if lookalike_hits else None
        ),
        "chance_nearest_known": 1 / len(known),
        "judged_concepts": {
            NAMES[k]: int(v) for k, v in zip(*np.unique(judged, return_counts=True), strict=True)
        },
    }
    if args.no_images:
        print(json.dumps(report, indent=1))
        return
    suffix = "" if args.strength == 1.0 else f"_sdedit{args.strength:g}"
    save_grid(gen_images[:64], IMG / f"glyphs_sd_seeclip_prompts{suffix}.png", cols=16)

    # histogram: tiny-glyphs known score of samples vs real knowns vs real unknowns
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real_src = np.concatenate([src[d][0][::8] for d in sources])
    real_cls = np.concatenate([np.array(spec.classes)[src[d][1][::8]] for d in sources])
    real_score = clip_probs(clip, real_src, known_texts, templates).max(-1)
    gen_score = clip_probs(clip, gen_images, known_texts, templates).max(-1)
    is_known = np.isin(real_cls, known)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(0, 1, 26)
    ax.hist(real_score[is_known], bins, alpha=0.5, density=True, label="real known")
    ax.hist(real_score[~is_known], bins, alpha=0.5, density=True, label="real unknown")
    ax.hist(gen_score, bins, alpha=0.5, density=True, label="tiny-glyphs-sd pseudo-unknowns")
    ax.set_xlabel("tiny-glyphs max softmax over the 12 known classes")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / f"glyphs_sd_scores{suffix}.png", dpi=120)
    report["known_score_mean"] = {
        "real_known": float(real_score[is_known].mean()),
        "real_unknown": float(real_score[~is_known].mean()),
        "pseudo_unknown": float(gen_score.mean()),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
