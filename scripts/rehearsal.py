"""Dress rehearsal of the users' real path at real shapes, with nothing downloaded.

What a user with PACS, Office-Home or miniDomainNet, CLIP ViT-B/16 weights and Stable
Diffusion 1.5 does, run end to end through the ``seeclip`` command line on this machine:

1. **Benchmark trees** with the benchmarks' real domain and class folder names (read from the
   package's own specs), a few images per (domain, class) cut from real photos that ship inside
   pip packages (scikit-image, scikit-learn, matplotlib): random crops and sizes, RGB and
   greyscale, JPEG and PNG, EXIF-rotated JPEGs, file names with spaces and non-ASCII letters;
   miniDomainNet also gets its ``splits_mini`` list files.
2. **Random CLIP weights** (open_clip, seeded) in the formats users hold: open_clip safetensors,
   a ``torch.save`` state dict ``.bin`` (as open_clip's hub repositories ship) and OpenAI's
   original TorchScript ``.pt``. Each is passed as ``--pretrained``: the first two must load
   bit for bit; the TorchScript file must be refused in one line with a conversion command,
   which is then run and its output loaded.
3. **A random diffusers folder with Stable Diffusion 1.5's exact architecture** (860M-parameter
   UNet, SD's VAE, a ViT-L/14 text encoder, the CLIP tokenizer built offline), fp16
   safetensors, cached so the next rehearsal reuses it; it must load through
   ``seeclip.generate.sd_pipeline.load_pipeline``.
4. ``seeclip prepare`` -> ``seeclip sweep`` (zeroshot, coop, seeclip with image-space
   pseudo-unknowns from that folder) -> ``seeclip report`` -> ``seeclip predict`` on unlabelled
   images, each as a child process with a private ``SEECLIP_HOME`` under ``--out``.
5. Wall time and peak RSS of every stage (the stage's child process and its descendants,
   from ``os.wait4``), printed as a table and written to ``--out/rehearsal.json`` with the
   machine's CPU count and torch version.

Random weights mean the accuracies are meaningless: this checks that the path runs at the
real shapes and what it costs, not how well SeeCLIP works. ``--reduced`` keeps the code path
and shrinks the models (open_clip ``tiny-vit`` weights, a tiny SD-shaped folder with the same
components) and the data (PACS, one target) for the test suite.

    python scripts/rehearsal.py --out /tmp/rehearsal [--trees pacs office_home mini_domainnet]
        [--targets first|all] [--per-class 3] [--sd-image-size 64] [--device cpu|cuda]
        [--dtype auto|fp32|bf16] [--pseudo sd_online] [--reduced]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

TREES = ("pacs", "office_home", "mini_domainnet")
METHODS = ("zeroshot", "coop", "seeclip")
# the image kinds a tree cycles through, so that every kind is present from 5 images on
KINDS = ("jpeg", "exif_jpeg", "gray_png", "png", "gray_jpeg")
EXIF_ORIENTATION = 0x0112  # the EXIF tag cameras write instead of rotating the pixels
SD15_UNET_PARAMS = 859_520_964  # UNet2DConditionModel of stable-diffusion-v1-5, counted
TREE_MARKER = "rehearsal-tree.json"
WEIGHTS_MARKER = "rehearsal-weights.json"
SD_MARKER = "rehearsal-sd.json"


def marker_matches(marker: Path, settings: dict) -> dict | None:
    """The JSON a finished writer left in ``marker`` when it was made with ``settings``."""
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("settings") == settings:
            return info
    return None


def weights_settings(arch: str, seed: int) -> dict:
    return {"arch": arch, "seed": seed}


def sd_settings(shape: str, seed: int) -> dict:
    return {"shape": shape, "seed": seed, "dtype": "float16"}


class RehearsalError(RuntimeError):
    """A stage failed or a check did not hold; the message says which and where to look."""


# ----------------------------------------------------------------------------- photos
def photo_files() -> list[Path]:
    """Real photos that pip packages ship (nothing is downloaded): scikit-image's
    ``skimage/data`` files, scikit-learn's sample images and matplotlib's sample data."""
    found: list[Path] = []
    try:
        import skimage.data

        folder = Path(skimage.data.__file__).parent
        names = (
            "astronaut.png",
            "coffee.png",
            "chelsea.png",
            "rocket.jpg",
            "camera.png",
            "motorcycle_left.png",
            "hubble_deep_field.jpg",
            "retina.jpg",
            "brick.png",
            "grass.png",
            "gravel.png",
            "moon.png",
            "coins.png",
            "page.png",
            "color.png",
            "ihc.png",
            "cell.png",
        )
        found += [folder / n for n in names]
    except ImportError:
        pass
    try:
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
        found += [folder / "china.jpg", folder / "flower.jpg"]
    except ImportError:
        pass
    try:
        import matplotlib

        folder = Path(matplotlib.get_data_path()) / "sample_data"
        found += [folder / "grace_hopper.jpg", folder / "Minduka_Present_Blue_Pack.png"]
    except ImportError:
        pass
    found = [p for p in found if p.is_file()]
    if len(found) < 3:
        raise RehearsalError(
            f"found {len(found)} sample photos in pip packages, need 3: "
            "pip install scikit-image scikit-learn matplotlib"
        )
    return found


def load_photos() -> list:
    """The sample photos as PIL images, greyscale ones kept greyscale (mode L)."""
    from PIL import Image

    photos = []
    for path in photo_files():
        with Image.open(path) as img:
            img.load()
            photos.append(
                img.convert("L") if img.mode in ("L", "1", "I;16") else img.convert("RGB")
            )
    return photos


def random_view(photo, rng: random.Random, min_side: int = 64, max_side: int = 480):
    """A random crop of ``photo`` (aspect ratio 1:2 to 2:1, 25-100% of the width), rescaled so
    that its longer side is between ``min_side`` and ``max_side`` px."""
    from PIL import Image

    w, h = photo.size
    aspect = rng.uniform(0.5, 2.0)  # width / height of the crop
    cw = rng.randint(max(8, w // 4), w)
    ch = min(h, max(8, round(cw / aspect)))
    cw = min(w, max(8, round(ch * aspect)))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = photo.crop((x, y, x + cw, y + ch))
    side = rng.randint(min_side, max_side)
    scale = side / max(cw, ch)
    size = (max(8, round(cw * scale)), max(8, round(ch * scale)))
    return crop.resize(size, Image.Resampling.BICUBIC)


def write_image(
    photo, folder: Path, index: int, kind: str, rng: random.Random, max_side: int = 480
) -> Path:
    """One image of ``kind`` (see ``KINDS``) cut from ``photo``, written under ``folder``.

    File names carry spaces and non-ASCII letters as real downloads do; an ``exif_jpeg`` is
    stored unrotated with an EXIF Orientation tag (3, 6 or 8), as phone cameras write them.
    """
    from PIL import Image

    img = random_view(photo, rng, min(64, max_side), max_side)
    if kind.startswith("gray"):
        img = img.convert("L")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    names = {
        "jpeg": f"img_{index:03d}.jpg",
        "exif_jpeg": f"rotated photo {index:03d}.jpg",
        "gray_png": f"grey_{index:03d}.png",
        "png": f"café crème {index:03d}.png",
        "gray_jpeg": f"фото_{index:03d}.jpeg",
    }
    path = folder / names[kind]
    if kind == "exif_jpeg":
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = rng.choice((3, 6, 8))
        img.save(path, quality=90, exif=exif)
    elif path.suffix == ".png":
        img.save(path)
    else:
        img.save(path, quality=90)
    return path


# ------------------------------------------------------------------------------ trees
def tree_base(benchmark: str, data_root: Path) -> Path:
    """The dataset folder a benchmark's layout looks for under ``data_root`` (its first
    ``dirnames`` entry: ``PACS``, ``office_home/OfficeHomeDataset_10072016``, ``domainnet``)."""
    from seeclip.datasets import get_benchmark

    spec = get_benchmark(benchmark)
    return data_root / spec.dirnames[0] if spec.dirnames else data_root


def build_tree(
    benchmark: str, data_root: Path | str, per_class: int = 3, seed: int = 0, max_side: int = 480
) -> dict:
    """Write ``benchmark``'s tree under ``data_root``: every domain and class folder of the
    spec, ``per_class`` images in each; miniDomainNet also gets ``splits_mini/<domain>_{train,
    test}.txt`` (images alternate train, test). A tree already built with the same settings is
    kept (its files' mtimes key the feature cache); another one is replaced.

    Returns a summary: images written, count per kind, the dataset folder.
    """
    from seeclip.datasets import get_benchmark

    spec = get_benchmark(benchmark)
    if spec.layout not in ("domain_folders", "mini_domainnet"):
        raise RehearsalError(f"{benchmark}: layout {spec.layout} is not rehearsed; pick {TREES}")
    least = 3 if spec.layout == "mini_domainnet" else 2  # a training and a validation image
    if per_class < least:
        raise RehearsalError(
            f"{benchmark}: --per-class {per_class} leaves no source-validation image; pass "
            f"--per-class {least} or more"
        )
    data_root = Path(data_root)
    settings = {
        "benchmark": benchmark,
        "per_class": per_class,
        "seed": seed,
        "max_side": max_side,
        "kinds": list(KINDS),
    }
    marker = data_root / TREE_MARKER
    if marker.is_file():
        summary = json.loads(marker.read_text())
        if summary.get("settings") == settings:
            return {**summary, "reused": True}
    base = tree_base(benchmark, data_root)
    if base.exists():
        shutil.rmtree(base)
    marker.unlink(missing_ok=True)
    photos = load_photos()
    rng = random.Random(seed)
    kinds: Counter = Counter()
    lists: dict[tuple[str, str], list[str]] = {}
    n = 0
    for domain in spec.domains:
        for label, cls in enumerate(spec.classes):
            folder = base / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                kind = KINDS[n % len(KINDS)]
                path = write_image(rng.choice(photos), folder, i, kind, rng, max_side)
                kinds[kind] += 1
                n += 1
                split = "test" if i % 2 else "train"
                rel = path.relative_to(base).as_posix()
                lists.setdefault((domain, split), []).append(f"{rel} {label}")
    if spec.layout == "mini_domainnet":
        splits = base / "splits_mini"
        splits.mkdir(parents=True, exist_ok=True)
        for domain in spec.domains:
            for split in ("train", "test"):
                lines = lists.get((domain, split), [])
                (splits / f"{domain}_{split}.txt").write_text("".join(x + "\n" for x in lines))
    summary = {
        "settings": settings,
        "images": n,
        "kinds": dict(kinds),
        "base": str(base),
        "domains": list(spec.domains),
        "classes": len(spec.classes),
    }
    marker.write_text(json.dumps(summary, indent=1))
    return {**summary, "reused": False}


def build_predict_folder(folder: Path | str, n: int = 10, seed: int = 99) -> list[Path]:
    """Unlabelled images for ``seeclip predict`` (every kind, in one flat folder)."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    photos, rng = load_photos(), random.Random(seed)
    return [
        write_image(rng.choice(photos), folder, i, KINDS[i % len(KINDS)], rng) for i in range(n)
    ]


# ------------------------------------------------------------------------- CLIP weights
def _openai_style_torchscript(backbone):
    """The model traced into a TorchScript module whose ``state_dict`` has the keys of OpenAI's
    original files: open_clip's names, plus ``input_resolution``, ``context_length`` and
    ``vocab_size`` as tensors, and no ``attn_mask`` (OpenAI keeps the causal mask as a plain
    attribute; open_clip's non-persistent buffer would otherwise be traced as a buffer)."""
    import torch

    model = backbone.model
    mask = model._buffers.pop("attn_mask", None)
    if mask is not None:
        model.attn_mask = mask  # a constant of the trace, as in OpenAI's module
    width = model.token_embedding.num_embeddings
    for key, value in (
        ("input_resolution", backbone.image_size),
        ("context_length", backbone.context_length),
        ("vocab_size", width),
    ):
        if hasattr(model, key) and key not in model._buffers:
            delattr(model, key)  # open_clip keeps context_length and vocab_size as ints
        model.register_buffer(key, torch.tensor(value))
    image = torch.zeros(1, 3, backbone.image_size, backbone.image_size)
    text = backbone.tokenize(["a photo of a dog."])
    with torch.no_grad():
        return torch.jit.trace(model, (image, text), strict=False, check_trace=False)


def write_clip_weights(arch: str, folder: Path | str, seed: int = 0) -> dict:
    """Random (seeded) open_clip ``arch`` weights in the three formats users hold.

    - ``open_clip_model.safetensors``: open_clip's safetensors state dict;
    - ``open_clip_pytorch_model.bin``: the same through ``torch.save``, as open_clip's hub
      repositories ship it;
    - ``<arch>.pt``: a TorchScript archive of the whole model (``torch.jit.trace`` +
      ``torch.jit.save``), the container of OpenAI's original CLIP files.
    """
    import torch
    from safetensors.torch import save_file

    from seeclip.backbone import build_backbone

    folder = Path(folder)
    files = {
        "safetensors": folder / "open_clip_model.safetensors",
        "bin": folder / "open_clip_pytorch_model.bin",
        "torchscript": folder / f"{arch}.pt",
    }
    settings = weights_settings(arch, seed)
    marker = folder / WEIGHTS_MARKER
    if info := marker_matches(marker, settings):
        return {**info, "files": {k: str(v) for k, v in files.items()}, "reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    backbone = build_backbone(arch, seed=seed)  # random, seeded; the global RNG is untouched
    model = backbone.model
    fingerprint = backbone.fingerprint  # before the TorchScript trace adds OpenAI's extras
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(files["safetensors"]))
    torch.save(state, files["bin"])
    torch.jit.save(_openai_style_torchscript(backbone), str(files["torchscript"]))
    info = {
        "settings": settings,
        "fingerprint": fingerprint,
        "parameters": sum(v.numel() for v in state.values()),
        "sizes_mib": {k: round(v.stat().st_size / 2**20, 1) for k, v in files.items()},
    }
    marker.write_text(json.dumps(info, indent=1))
    return {"files": {k: str(v) for k, v in files.items()}, "reused": False, **info}


def check_clip_weights(arch: str, folder: Path | str, seed: int = 0) -> dict:
    """Pass each weights file as ``--pretrained`` would and say what seeclip did with it.

    A loadable file must give exactly the written model (its fingerprint), built from another
    seed so that random weights cannot pass for loaded ones. The TorchScript file must be
    refused; the conversion command its one-line error names is run (the file is ours, so it
    is trusted) and the converted state dict must load too.
    """
    from seeclip.backbone import build_backbone, has_weights
    from seeclip.io import UnreadableFileError

    folder = Path(folder)
    info = json.loads((folder / WEIGHTS_MARKER).read_text())
    want = info["fingerprint"]
    other_seed = seed + 1
    if build_backbone(arch, seed=other_seed).fingerprint == want:
        raise RehearsalError(f"{arch}: seeds {seed} and {other_seed} give the same random weights")
    out: dict = {}
    for fmt, name in (
        ("safetensors", "open_clip_model.safetensors"),
        ("bin", "open_clip_pytorch_model.bin"),
        ("torchscript", f"{arch}.pt"),
    ):
        path = folder / name
        row = {"file": name, "has_weights": has_weights(arch, str(path))}
        try:
            got = build_backbone(arch, pretrained=str(path), seed=other_seed).fingerprint
            row.update(behaviour="loaded", identical=got == want)
        except UnreadableFileError as err:
            msg = str(err)
            row.update(behaviour="refused", message=msg, one_line="\n" not in msg)
            command = re.search(r'python -c "(.+?)" and pass', msg)
            row["conversion_command"] = bool(command)
            if command:
                converted = subprocess.run(
                    [sys.executable, "-c", command.group(1)], capture_output=True, text=True
                )
                row["conversion_rc"] = converted.returncode
                target = folder / f"{path.stem}-state_dict.pt"
                if converted.returncode == 0 and target.is_file():
                    got = build_backbone(arch, pretrained=str(target), seed=other_seed).fingerprint
                    row["converted_identical"] = got == want
        out[fmt] = row
    ok = (
        out["safetensors"].get("identical")
        and out["bin"].get("identical")
        and all(r["has_weights"] for r in out.values())
        and out["torchscript"]["behaviour"] in ("loaded", "refused")
        and (
            out["torchscript"].get("identical")
            or (
                out["torchscript"].get("one_line") and out["torchscript"].get("converted_identical")
            )
        )
    )
    return {"formats": out, "ok": bool(ok)}


# --------------------------------------------------------------------------- SD folder
def _sd_components(shape: str, tokenizer):
    """UNet, VAE, text encoder and scheduler of SD-1.5 (``sd15``: the published configs) or
    of the same layout at tiny widths (``tiny``), randomly initialised."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if shape == "sd15":
        unet = diffusers.UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text = CLIPTextConfig(  # CLIP ViT-L/14's text tower
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            **ids,
        )
    elif shape == "tiny":
        unet = diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=4,
            sample_size=32,
            scaling_factor=0.18215,
        )
        text = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
            **ids,
        )
    else:
        raise RehearsalError(f"unknown SD shape {shape!r}: pick sd15 or tiny")
    scheduler = diffusers.PNDMScheduler(  # SD-1.5's scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return unet, vae, CLIPTextModel(text).eval(), scheduler


def write_sd_folder(folder: Path | str, shape: str = "sd15", seed: int = 0) -> dict:
    """A random diffusers ``StableDiffusionPipeline`` folder (fp16 safetensors), reused when a
    complete one of the same settings is there (its marker is written last).

    The tokenizer is seeclip's offline CLIP tokenizer (``seeclip.zoo.sd_export``), the files
    SD-1.5's ``tokenizer/`` folder holds.
    """
    import diffusers
    import torch

    from seeclip.zoo.sd_export import clip_tokenizer, write_tokenizer

    folder = Path(folder)
    settings = sd_settings(shape, seed)
    if info := marker_matches(folder / SD_MARKER, settings):
        return {**info, "reused": True}
    partial = folder.with_name(folder.name + ".partial")
    for stale in (partial, folder):
        if stale.exists():
            shutil.rmtree(stale)
    tokenizer = clip_tokenizer(77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder, scheduler = _sd_components(shape, tokenizer)
    params = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(str(partial), safe_serialization=True)
    shutil.rmtree(partial / "tokenizer")
    write_tokenizer(partial / "tokenizer", 77)
    size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
    info = {"settings": settings, "parameters": params, "size_mib": round(size / 2**20, 1)}
    (partial / SD_MARKER).write_text(json.dumps(info, indent=1))
    partial.rename(folder)
    return {**info, "reused": False}


def check_sd_folder(folder: Path | str) -> dict:
    """Load the folder the way ``train.sd_model=<folder>`` does: ``locate_pipeline`` then
    ``load_pipeline`` (local files only), and count what came back."""
    from seeclip.generate.sd_pipeline import load_pipeline, locate_pipeline

    source, shipped = locate_pipeline(str(folder))
    pipe = load_pipeline(str(folder), device="cpu", progress=False)
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }
    return {
        "located": source,
        "shipped": shipped,
        "classes": {
            name: type(getattr(pipe, name)).__name__
            for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        },
        "parameters": params,
        "dtype": str(pipe.unet.dtype),
        "vocab": len(pipe.tokenizer),
        "sd15_unet": params["unet"] == SD15_UNET_PARAMS,
    }


# ------------------------------------------------------------------------ child stages
def _stage_main(name: str, payload: dict) -> int:
    """Run one in-script stage in this (child) process; its result goes to ``payload["out"]``."""
    if name == "build_tree":
        result = build_tree(
            payload["benchmark"], payload["data_root"], payload["per_class"], payload["seed"]
        )
        if payload.get("predict_dir"):
            result["predict_images"] = len(build_predict_folder(payload["predict_dir"]))
    elif name == "write_weights":
        result = write_clip_weights(payload["arch"], payload["folder"], payload["seed"])
    elif name == "check_weights":
        result = check_clip_weights(payload["arch"], payload["folder"], payload["seed"])
    elif name == "write_sd":
        result = write_sd_folder(payload["folder"], payload["shape"], payload["seed"])
    elif name == "check_sd":
        result = check_sd_folder(payload["folder"])
    else:
        raise RehearsalError(f"unknown stage {name!r}")
    Path(payload["out"]).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


class Stages:
    """Runs each stage as a child process and records its wall time and peak RSS."""

    def __init__(self, out: Path, env: dict[str, str]) -> None:
        self.out, self.env, self.records = out, env, []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, stage: str, tree: str, cmd: list[str], *, result: Path | None = None) -> dict:
        """Run ``cmd``; stop with the log's tail when it fails. Returns the stage's record."""
        log = self.out / "logs" / f"{tree}-{stage}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {tree:<15} {stage} ...", flush=True)
        start = time.perf_counter()
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's (and its children's) peak
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        # ru_maxrss is in KiB on Linux, bytes on macOS
        peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        record = {
            "stage": stage,
            "tree": tree,
            "seconds": round(seconds, 1),
            "peak_mib": round(peak),
            "rc": rc,
            "log": str(log),
        }
        if result is not None and result.is_file():
            record["result"] = json.loads(result.read_text())
        self.records.append(record)
        print(f"           {seconds:8.1f} s  {peak:8.0f} MiB  rc {rc}", flush=True)
        if rc != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(True)[-25:])
            raise RehearsalError(f"{tree} {stage} failed (rc {rc}); log {log}:\n{tail}")
        return record

    def reused(self, stage: str, tree: str, info: dict) -> dict:
        """A writer's output already there (its marker matches): recorded, not rerun."""
        print(f"[{time.strftime('%H:%M:%S')}] {tree:<15} {stage}: reused", flush=True)
        record = {"stage": stage, "tree": tree, "seconds": 0.0, "peak_mib": 0, "rc": 0}
        self.records.append({**record, "result": {**info, "reused": True}})
        return self.records[-1]

    def script(self, stage: str, tree: str, payload: dict) -> dict:
        """An in-script stage (``_stage_main``) in a child process."""
        result = self.out / "logs" / f"{tree}-{stage}.json"
        result.unlink(missing_ok=True)
        payload = {**payload, "out": str(result)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage]
        return self.run(stage, tree, cmd + ["--stage-args", json.dumps(payload)], result=result)

    def seeclip(self, stage: str, tree: str, *args: str) -> dict:
        """A ``seeclip`` command through ``python -m seeclip``."""
        return self.run(stage, tree, [sys.executable, "-m", "seeclip", *args])


# ---------------------------------------------------------------------------- checks
def _final_records(runs: Path) -> list[dict]:
    out = []
    for done in sorted(runs.glob("*/*/done")):
        lines = (done.parent / "results.jsonl").read_text().splitlines()
        finals = [json.loads(x) for x in lines if '"final"' in x]
        finals = [r for r in finals if r.get("kind") == "final"]
        if finals:
            out.append({**finals[-1], "run_dir": str(done.parent)})
    return out


def check_runs(benchmark: str, runs: Path, targets: list[str], methods: list[str]) -> dict:
    """Every (method, target) finished, and each record names the tree's classes."""
    from seeclip.datasets import get_benchmark

    spec = get_benchmark(benchmark)
    records = _final_records(runs)
    got = {(r["method"], r["target"]) for r in records}
    missing = [f"{m}/{t}" for m in methods for t in targets if (m, t) not in got]
    known = set(spec.protocols["full"].known)
    classes_ok = all(set(r["classes"]["known"]) == known for r in records)
    sd_pools = [
        r["run_dir"]
        for r in records
        if r["method"] == "seeclip"
        and r["config"]["train"]["pseudo_unknowns"] not in ("none", "mixup")
    ]
    online = [r.get("pseudo_images_drawn") for r in records if r["method"] == "seeclip"]
    return {
        "runs": len(records),
        "missing": missing,
        "classes_named": classes_ok,
        "seeclip_runs_with_sd_pseudo_unknowns": len(sd_pools),
        # sd_online: the images its generator drew during training, per seeclip run
        "seeclip_online_images_drawn": online,
        "h_score": {f"{r['method']}/{r['target']}": r.get("h_score") for r in records},
    }


def check_pools(home: Path) -> dict:
    """The image-space pools the seeclip runs drew (``<home>/pools/images/sd-*``)."""
    from PIL import Image

    pools = sorted(home.glob("pools/images/sd-*/manifest.csv"))
    images = [p.parent / row["path"] for p in pools for row in csv.DictReader(p.open())]
    sizes = set()
    for path in images:
        with Image.open(path) as img:
            sizes.add(img.size)
    return {"pools": len(pools), "images": len(images), "sizes": sorted(sizes)}


def check_exif(base: Path) -> dict:
    """Whether seeclip's image reader shows EXIF-rotated JPEGs as a viewer does (rotated by
    their Orientation tag) or as stored."""
    from PIL import Image, ImageOps

    from seeclip.datasets.images import load_image

    paths = sorted(base.rglob("rotated photo *.jpg"))
    turned = []
    for path in paths:
        with Image.open(path) as img:
            shown = ImageOps.exif_transpose(img).size
            stored = img.size
        if shown != stored:
            turned.append(load_image(path).size == shown)
    return {"exif_images": len(paths), "quarter_turned": len(turned), "applied": all(turned)}


def check_predictions(csv_path: Path, images: int, benchmark: str) -> dict:
    """One row per image, no errors, each a known class of the protocol or ``unknown``."""
    from seeclip.datasets import get_benchmark

    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    known = set(get_benchmark(benchmark).protocols["full"].known)
    labels = Counter(r["prediction"] for r in rows)
    return {
        "rows": len(rows),
        "images": images,
        "errors": sum(bool(r["error"]) for r in rows),
        "labels_valid": all(x in known or x == "unknown" for x in labels),
        "labels": dict(labels),
    }


# ------------------------------------------------------------------------------ main
def machine() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _table(records: list[dict]) -> str:
    lines = ["| tree | stage | seconds | peak MiB |", "|---|---|---|---|"]
    for r in records:
        note = " (reused)" if r.get("result", {}).get("reused") else ""
        lines.append(f"| {r['tree']} | {r['stage']}{note} | {r['seconds']} | {r['peak_mib']} |")
    return "\n".join(lines)


def _pseudo_sources() -> list[str]:
    from seeclip.pseudo import PSEUDO_UNKNOWNS

    return list(PSEUDO_UNKNOWNS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=False, help="folder for trees, runs, reports and the record")
    p.add_argument("--trees", nargs="+", choices=TREES, help="benchmark trees (default: all)")
    p.add_argument(
        "--targets",
        choices=("first", "all"),
        default="all",
        help="target domains per tree: the first, or all (default)",
    )
    p.add_argument("--per-class", type=int, help="images per domain and class (default 3)")
    p.add_argument("--clip-arch", help="open_clip architecture of the random CLIP (ViT-B-16)")
    p.add_argument("--sd-shape", choices=("sd15", "tiny"), help="SD folder's widths (sd15)")
    p.add_argument("--sd-image-size", type=int, help="train.sd_image_size in px (default 64)")
    p.add_argument("--sample-steps", type=int, default=2, help="diffusion.sample_steps (2)")
    p.add_argument("--pool-per-domain", type=int, help="diffusion.pool_per_domain (default 4)")
    p.add_argument("--epochs", type=int, default=1, help="train.epochs (1)")
    p.add_argument(
        "--pseudo",
        default="sd_online",
        help="seeclip's train.pseudo_unknowns (default sd_online, the paper's generator as the "
        "real-benchmark presets run it; sd_* options go with any sd_ source)",
    )
    p.add_argument("--sd-every", type=int, help="train.sd_every, for a source that reads it")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="prompt.text_precision: auto = bf16 on cuda, fp32 on cpu",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per child")
    p.add_argument("--cache", help="folder of reusable weights (default: OUT/cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reduced",
        action="store_true",
        help="the cheap version for tests: pacs, first target, 2 images per class, tiny-vit "
        "weights and a tiny SD-shaped folder (same code path)",
    )
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage is None and not args.out:
        p.error("--out DIR is required")
    full = {
        "trees": list(TREES),
        "per_class": 3,
        "clip_arch": "ViT-B-16",
        "sd_shape": "sd15",
        "sd_image_size": 64,
        "pool_per_domain": 4,
    }
    reduced = {
        "trees": ["pacs"],
        "per_class": 2,
        "clip_arch": "tiny-vit",
        "sd_shape": "tiny",
        "sd_image_size": 32,
        "pool_per_domain": 2,
    }
    for key, value in (reduced if args.reduced else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reduced and "--targets" not in (argv if argv is not None else sys.argv):
        args.targets = "first"
    return args


def rehearse(args: argparse.Namespace) -> dict:
    """The whole rehearsal; returns (and writes) its record."""
    import torch

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).absolute() if args.cache else out / "cache"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RehearsalError("--device cuda: torch sees no GPU here; pass --device cpu")
    if args.pseudo not in _pseudo_sources():
        raise RehearsalError(
            f"--pseudo {args.pseudo}: this seeclip has no such pseudo-unknown source; pick one "
            f"of {', '.join(_pseudo_sources())} (seeclip list pseudo)"
        )
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if args.device == "cuda" else "fp32")
    home = out / "home"
    env = {
        **os.environ,
        "SEECLIP_HOME": str(home),  # manifests, feature cache, pools: never the user's
        "HF_HOME": str(out / "hf_home"),
        "HF_HUB_OFFLINE": "1",  # nothing is downloaded; a download attempt fails loudly
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
    }
    stages = Stages(out, env)
    weights = cache / f"clip-{args.clip_arch}-seed{args.seed}"
    sd_folder = cache / f"sd-{args.sd_shape}-random-seed{args.seed}"
    checks: dict = {}
    t0 = time.perf_counter()
    if info := marker_matches(
        weights / WEIGHTS_MARKER, weights_settings(args.clip_arch, args.seed)
    ):
        stages.reused("write_weights", "setup", info)
    else:
        payload = {"arch": args.clip_arch, "folder": str(weights), "seed": args.seed}
        stages.script("write_weights", "setup", payload)
    rec = stages.script(
        "check_weights",
        "setup",
        {"arch": args.clip_arch, "folder": str(weights), "seed": args.seed},
    )
    checks["weights"] = rec["result"]
    if not rec["result"]["ok"]:
        raise RehearsalError(f"CLIP weights check failed: {json.dumps(rec['result'])}")
    if info := marker_matches(sd_folder / SD_MARKER, sd_settings(args.sd_shape, 0)):
        stages.reused("write_sd", "setup", info)
    else:
        payload = {"folder": str(sd_folder), "shape": args.sd_shape, "seed": 0}
        stages.script("write_sd", "setup", payload)
    rec = stages.script("check_sd", "setup", {"folder": str(sd_folder)})
    checks["sd_folder"] = rec["result"]
    pretrained = weights / "open_clip_model.safetensors"
    threads = ["--threads", str(args.threads)]
    for tree in args.trees:
        from seeclip.datasets import get_benchmark

        spec = get_benchmark(tree)
        data_root = out / "data" / tree
        predict_dir = out / "predict_images" / tree
        rec = stages.script(
            "build_tree",
            tree,
            {
                "benchmark": tree,
                "data_root": str(data_root),
                "per_class": args.per_class,
                "seed": args.seed,
                "predict_dir": str(predict_dir),
            },
        )
        n_predict = rec["result"]["predict_images"]
        stages.seeclip("prepare", tree, "prepare", tree, "--data-root", str(data_root))
        targets = list(spec.targets[:1] if args.targets == "first" else spec.targets)
        sd = [
            f"train.pseudo_unknowns={args.pseudo}",
            f"train.sd_model={sd_folder}",
            f"train.sd_image_size={args.sd_image_size}",
            f"diffusion.sample_steps={args.sample_steps}",
            f"diffusion.pool_per_domain={args.pool_per_domain}",
        ]
        if args.pseudo.startswith("sd_") and args.sd_every is not None:
            sd.append(f"train.sd_every={args.sd_every}")
        if not args.pseudo.startswith("sd_"):
            sd = sd[:1] + sd[3:]  # sd_* keys only for an image-space source
        runs = out / "runs" / tree
        # one source image per (domain, class) held out for thresholds and selection, as
        # data.val_fraction=0.1 does at the real benchmarks' 40-700 images per class
        n_source = -(-args.per_class // 2) if spec.layout == "mini_domainnet" else args.per_class
        overrides = [
            f"data.data_root={data_root}",
            f"data.val_fraction={min(0.5, 1 / n_source):.3f}",
            f"backbone.name={args.clip_arch}",
            f"backbone.pretrained={pretrained}",
            f"train.epochs={args.epochs}",
        ]
        if dtype == "bf16":
            overrides.append("prompt.text_precision=bf16")
        stages.seeclip(
            "sweep",
            tree,
            "sweep",
            "--config",
            tree,
            "--methods",
            # the baselines run the preset as it is: its generator concerns seeclip only
            "zeroshot",
            "coop",
            "seeclip:" + ",".join([*sd, "label=seeclip"]),
            "--protocols",
            "full",
            "--targets",
            *targets,
            "--seeds",
            str(args.seed),
            "--jobs",
            "1",
            *threads,
            "--runs-dir",
            str(runs),
            "--cache-dir",
            str(home),
            "--device",
            args.device,
            "--no-progress",
            *overrides,
        )
        report = out / "reports" / tree
        stages.seeclip("report", tree, "report", str(runs), "--out", str(report))
        run_checks = check_runs(tree, runs, targets, list(METHODS))
        seeclip_runs = sorted(
            Path(r["run_dir"]) for r in _final_records(runs) if r["method"] == "seeclip"
        )
        if not seeclip_runs:
            raise RehearsalError(f"{tree}: no finished seeclip run under {runs}")
        preds = out / "predictions" / f"{tree}.csv"
        stages.seeclip(
            "predict",
            tree,
            "predict",
            "--run",
            str(seeclip_runs[0]),
            str(predict_dir),
            "--out",
            str(preds),
            *threads,
            "--device",
            args.device,
        )
        checks[tree] = {
            **run_checks,
            "targets": targets,
            "report_files": sorted(
                str(p.relative_to(report)) for p in report.rglob("*") if p.is_file()
            ),
            "predict": check_predictions(preds, n_predict, tree),
            "images": rec["result"]["images"],
            "kinds": rec["result"]["kinds"],
            "sd_pools": check_pools(home),
            "exif_orientation": check_exif(tree_base(tree, data_root)),
        }
    record = {
        "machine": machine(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "trees",
                "targets",
                "per_class",
                "clip_arch",
                "sd_shape",
                "sd_image_size",
                "sample_steps",
                "pool_per_domain",
                "epochs",
                "pseudo",
                "sd_every",
                "device",
                "threads",
                "reduced",
                "seed",
            )
        }
        | {"dtype": dtype},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "stages": stages.records,
        "checks": checks,
    }
    (out / "rehearsal.json").write_text(json.dumps(record, indent=1, ensure_ascii=False))
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage is not None:
        return _stage_main(args.stage, json.loads(args.stage_args))
    try:
        record = rehearse(args)
    except RehearsalError as err:
        print(f"rehearsal: error: {err}", file=sys.stderr)
        return 1
    print()
    print(_table(record["stages"]))
    print(f"\ntotal {record['total_seconds']} s; record {Path(args.out) / 'rehearsal.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
