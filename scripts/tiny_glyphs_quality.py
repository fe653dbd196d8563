"""The quality bars of tiny-glyphs (docs/tiny_clip.md): zero-shot accuracy, local detail, text.

1. Zero-shot accuracy over the 24 benchmark classes, per domain, on the generated glyphs
   benchmark (template ensemble of the card, and the single template of `seeclip eval`).
2. Local detail: for each (hard unknown, look-alike) pair of specs/glyphs.yaml, a logistic
   regression on the frozen features separates the two classes. It is fitted on images drawn
   with the corpus fonts and photos and tested on images drawn with the benchmark's (held-out)
   fonts and photos, all four styles, once on the 36 spatial tokens (flattened) and once on the
   global embedding; the random-weights tower is the reference. Each probe's L2 strength is
   chosen by 4-fold cross-validation on the fit images (corpus fonts and photos) only, and that
   cross-validated accuracy is printed too (a reading that never sees the held-out fonts).
3. The text side: the learned logit scale, the norm of the token embedding of "unknown"
   against the mean norm of the benchmark class words, and the cosine of "a photo of the
   unknown." with the class prompts.

    python scripts/tiny_glyphs_quality.py [--weights PATH]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from seeclip.backbone import build_backbone
from seeclip.datasets import get_benchmark
from seeclip.datasets.digits import read_meta
from seeclip.datasets.glyphs import DOMAINS, render_glyph
from seeclip.paths import seeclip_home
from seeclip.zoo.pretrain import default_config, load_benchmark_arrays, to_input
from seeclip.zoo.pretrain import zero_shot_accuracy as accuracy
from seeclip.zoo.tiny_clip import TINY_MODELS

N_FIT, N_TEST = 400, 200  # images per class of a pair (over the four styles)


def _images(name: str, role: str, n: int, seed: int) -> np.ndarray:
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 7, i, sum(map(ord, name))])
        out.append(render_glyph(name, DOMAINS[i % 4], rng, role=role)[0])
    return np.stack(out)


@torch.no_grad()
def _features(backbone, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g, t = [], []
    for i in range(0, len(images), 256):
        a, b = backbone.encode_image(to_input(images[i : i + 256]))
        g.append(a.numpy())
        t.append(b.numpy())
    return np.concatenate(g), np.concatenate(t)


def _flat(tokens: np.ndarray) -> np.ndarray:
    """The 36 tokens side by side: a weight per position (position-specific)."""
    return tokens.reshape(len(tokens), -1)


def _pooled(tokens: np.ndarray) -> np.ndarray:
    """Mean and max over the 36 positions, per channel: a fixed, position-invariant reading."""
    return np.concatenate([tokens.mean(axis=1), tokens.max(axis=1)], axis=1)


PROBE_CS = (0.001, 0.01, 0.1, 1.0)  # L2 strengths; one is chosen per probe on the fit set only


def _probe(x_fit, y_fit, x_test, y_test, cv_scores: list | None = None) -> float:
    """Held-out accuracy of a logistic regression whose C is chosen by 4-fold CV on the fit set.

    Each feature set gets its own C (the tokens have 36x the global embedding's dimensions);
    the held-out fonts and photos are never used to choose it. The CV accuracy at that C (fit
    images only, standardised on all of them) is appended to ``cv_scores`` when given.
    """
    cv = LogisticRegressionCV(Cs=list(PROBE_CS), cv=4, max_iter=3000)
    clf = make_pipeline(StandardScaler(), cv).fit(x_fit, y_fit)
    if cv_scores is not None:
        folds_by_c = next(iter(cv.scores_.values()))  # [folds, Cs]
        cv_scores.append(float(folds_by_c.mean(axis=0).max()))
    return float(clf.score(x_test, y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(TINY_MODELS["tiny-glyphs"].weights))
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = get_benchmark("glyphs")
    cfg = default_config("glyphs")
    trained = build_backbone("tiny-glyphs", pretrained=args.weights)
    random = build_backbone("tiny-glyphs-random")
    model, tokenizer = trained.model, trained.tokenizer
    names = tuple(spec.class_text(c) for c in spec.classes)

    data = load_benchmark_arrays(n_per_class=cfg.eval_n_per_class, world="glyphs")
    columns = {
        "ensemble": accuracy(
            model, tokenizer, data, templates=cfg.eval_templates, classnames=names
        ),
        "single template": accuracy(
            model, tokenizer, data, templates=(spec.template,), classnames=names
        ),
        "random weights": accuracy(
            random.model, tokenizer, data, templates=(spec.template,), classnames=names
        ),
    }
    print(f"## zero-shot, {len(names)}-way, {len(data[spec.domains[0]][1])} images per domain\n")
    print("| domain | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for d in spec.domains:
        print(f"| {d} | " + " | ".join(f"{c[d]:.1%}" for c in columns.values()) + " |")
    means = [np.mean([c[d] for d in spec.domains]) for c in columns.values()]
    print("| **mean** | " + " | ".join(f"**{m:.1%}**" for m in means) + " |")

    print("\n## linear probes on (hard unknown, look-alike) pairs, held-out fonts and photos\n")
    print(
        "| pair | tokens (flattened) | tokens (mean+max pooled) | global | random-init tokens "
        "(flattened) | random-init tokens (mean+max pooled) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    rows, cv_tokens, cv_global = [], [], []
    for hard, known in spec.lookalikes.items():
        fit = np.concatenate(
            [_images(hard, "corpus", N_FIT, 0), _images(known, "corpus", N_FIT, 0)]
        )
        test = np.concatenate(
            [_images(hard, "benchmark", N_TEST, 1), _images(known, "benchmark", N_TEST, 1)]
        )
        y_fit, y_test = np.repeat([0, 1], N_FIT), np.repeat([0, 1], N_TEST)
        (gf, tf), (gt, tt) = _features(trained, fit), _features(trained, test)
        (_, rf), (_, rt) = _features(random, fit), _features(random, test)
        row = (
            _probe(_flat(tf), y_fit, _flat(tt), y_test, cv_tokens),
            _probe(_pooled(tf), y_fit, _pooled(tt), y_test),
            _probe(gf, y_fit, gt, y_test, cv_global),
            _probe(_flat(rf), y_fit, _flat(rt), y_test),
            _probe(_pooled(rf), y_fit, _pooled(rt), y_test),
        )
        rows.append(row)
        print(f"| {hard}/{known} | " + " | ".join(f"{v:.1%}" for v in row) + " |")
    mean = np.mean(rows, axis=0)
    print("| **mean** | " + " | ".join(f"**{v:.1%}**" for v in mean) + " |")
    print("| **min** | " + " | ".join(f"{v:.1%}" for v in np.min(rows, axis=0)) + " |")
    print(
        f"\nThe same probes by 4-fold CV on the fit images only (corpus fonts and photos), mean "
        f"over pairs: tokens (flattened) {np.mean(cv_tokens):.1%}, global "
        f"{np.mean(cv_global):.1%}"
    )

    print("\n## text side\n")
    table = model.token_embedding.weight
    unknown_id = int(tokenizer(["unknown"])[0, 1])
    word_ids = {int(i) for n in names for i in tokenizer([n])[0, 1:] if 0 < int(i) < 49406}
    word_norm = table[sorted(word_ids)].norm(dim=-1).mean().item()
    rand_norm = random.model.token_embedding.weight[unknown_id].norm().item()
    print(f"- logit scale: {model.logit_scale.exp().item():.1f}")
    print(
        f"- ||embedding('unknown')||: {table[unknown_id].norm().item():.3f}; class words' mean "
        f"{word_norm:.3f}; at random init {rand_norm:.3f}"
    )
    with torch.no_grad():
        classes = trained.encode_text([spec.template.format(n) for n in names])
        unknown = trained.encode_text([spec.template.format("unknown")])
    cos = (unknown @ classes.T)[0]
    top = cos.argsort(descending=True)[:3]
    print(
        f"- cos('{spec.template.format('unknown')}', classes): max {cos.max():.2f} "
        f"({', '.join(f'{names[i]} {cos[i]:.2f}' for i in top)}), mean {cos.mean():.2f}"
    )
    meta = read_meta(seeclip_home() / "data" / "glyphs")
    print(f"\ndata: {meta['content_hash'][:16]} (glyphs benchmark content hash)")


if __name__ == "__main__":
    main()
