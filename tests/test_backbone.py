"""The frozen CLIP wrapper: readings, truncated text encoding, weights and fingerprints."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from seeclip import hub
from seeclip.backbone import (
    BACKBONES,
    WeightsUnavailableError,
    build_backbone,
    list_backbones,
)

torch.set_num_threads(1)

CONFIGS = Path(__file__).parents[1] / "src" / "seeclip" / "model_configs"


@pytest.fixture(scope="module", params=list(BACKBONES))
def backbone(request):
    return build_backbone(request.param, seed=0)


@pytest.fixture(scope="module")
def vit():
    return build_backbone("tiny-vit", seed=0)


def _images(backbone, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=g)


PROMPTS = [
    "x",
    "a photo of a dog.",
    "a sketch of a very small red bird sitting on a branch.",
    "word " * 40,  # longer than the context: truncated by the tokenizer, EOT at the last slot
]


def test_frozen_and_eval(backbone):
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.model.training


def test_image_readings(backbone):
    images = _images(backbone)
    glob, tokens = backbone.encode_image(images)
    assert glob.shape == (3, backbone.embed_dim)
    assert tokens.shape == (3, backbone.num_patches, backbone.embed_dim)
    torch.testing.assert_close(glob.norm(dim=-1), torch.ones(3))
    assert torch.equal(glob, backbone.model.encode_image(images, normalize=True))


def test_token_counts():
    assert build_backbone("tiny-vit").num_patches == 16  # (32 / 8) ** 2
    assert build_backbone("tiny-rn").num_patches == 4  # (64 / 32) ** 2
    assert build_backbone("tiny-digits-random").num_patches == 16  # output stride 8 at 32 px


def test_vit_tokens_match_manual(vit):
    v = vit.model.visual
    images = _images(vit)
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    x = v.ln_pre(x + v.positional_embedding)
    x = v.ln_post(v.transformer(x))
    expected = x[:, 1:] @ v.proj  # CLS excluded
    torch.testing.assert_close(vit.encode_image(images)[1], expected, rtol=1e-5, atol=1e-5)


def test_rn_tokens_are_maskclip_reading():
    rn = build_backbone("tiny-rn")
    v = rn.model.visual
    images = _images(rn)
    fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))  # [B, C, 2, 2]
    pool = v.attnpool
    expected = pool.c_proj(pool.v_proj(fmap.flatten(2).transpose(1, 2)))
    torch.testing.assert_close(rn.encode_image(images)[1], expected)


def test_truncated_text_is_exact(backbone):
    ids = backbone.tokenize(PROMPTS)
    assert ids.shape == (len(PROMPTS), backbone.context_length)
    eot = backbone.eot_index(ids)
    assert eot.tolist()[:3] == [2, 7, 14] and eot[3] == backbone.context_length - 1
    embeds = backbone.embed_tokens(ids)
    full = backbone.encode_text_embeddings(embeds, eot, truncate=False)
    reference = backbone.model.encode_text(ids)
    torch.testing.assert_close(full, reference, rtol=0, atol=1e-5)
    for subset in ([0], [0, 1], [1, 2]):  # short batches actually truncate
        sub = backbone.encode_text_embeddings(embeds[subset], eot[subset], truncate=True)
        torch.testing.assert_close(sub, reference[subset], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        backbone.encode_text(PROMPTS), torch.nn.functional.normalize(reference)
    )


def test_gradients_reach_embeddings(vit):
    ids = vit.tokenize(PROMPTS[:3])
    embeds = vit.embed_tokens(ids).detach().requires_grad_(True)
    vit.encode_text_embeddings(embeds, vit.eot_index(ids)).pow(2).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert embeds.grad[0, 3:].abs().sum() == 0  # past its EOT a prompt gets no gradient


def test_logit_scale_is_exp_of_parameter(vit):
    assert vit.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)


def test_fingerprint_follows_seed_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = (build_backbone("tiny-vit", seed=s) for s in (0, 0, 1))
    assert torch.equal(state, torch.random.get_rng_state())
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.pretrained is None
    assert build_backbone("tiny-rn", seed=0).fingerprint != a.fingerprint


@pytest.mark.parametrize("fmt", ["pt", "wrapped.pt", "safetensors"])
def test_local_checkpoint_roundtrip(vit, tmp_path, fmt):
    state = {k: v.clone() for k, v in vit.model.state_dict().items()}
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state} if fmt.startswith("wrapped") else state, path)
    loaded = build_backbone("tiny-vit", pretrained=str(path), seed=123)
    assert loaded.fingerprint == vit.fingerprint
    assert loaded.pretrained == str(path)
    images = _images(vit)
    for got, want in zip(loaded.encode_image(images), vit.encode_image(images), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(loaded.encode_text(PROMPTS), vit.encode_text(PROMPTS))


def test_checkpoint_of_other_arch_is_a_clear_error(tmp_path):
    path = tmp_path / "rn.safetensors"
    save_file(dict(build_backbone("tiny-rn").model.state_dict()), str(path))
    with pytest.raises(ValueError, match=r"does not fit architecture 'tiny-vit'.*missing"):
        build_backbone("tiny-vit", pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        build_backbone("tiny-vit", pretrained=str(tmp_path / "absent.pt"))


def _same_readings(a, b) -> None:
    images = _images(a)
    for got, want in zip(a.encode_image(images), b.encode_image(images), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(a.encode_text(PROMPTS), b.encode_text(PROMPTS))


@pytest.mark.parametrize("wrapped", [False, True])
def test_ddp_saved_state_dict_loads(vit, tmp_path, wrapped):
    """DistributedDataParallel saves every key as ``module.<key>``; the prefix is removed."""
    state = {f"module.{k}": v.clone() for k, v in vit.model.state_dict().items()}
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": state} if wrapped else state, path)
    loaded = build_backbone("tiny-vit", pretrained=str(path), seed=123)
    assert loaded.fingerprint == vit.fingerprint
    _same_readings(loaded, vit)


def test_module_prefix_on_some_keys_only_is_not_stripped(vit, tmp_path):
    state = dict(vit.model.state_dict())
    state["module.logit_scale"] = state.pop("logit_scale")
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing: logit_scale.*unexpected: module.logit_scale"):
        build_backbone("tiny-vit", pretrained=str(path))


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(state: dict, path: Path) -> None:
    """A TorchScript file whose state_dict is ``state``, as OpenAI's original files are."""
    import warnings

    root = _Holder()
    for key, value in state.items():
        *names, leaf = key.split(".")
        module = root
        for name in names:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        torch.jit.script(root).save(str(path))


def test_torchscript_archive_is_refused_with_the_command_that_converts_it(vit, tmp_path):
    import shlex
    import warnings

    from seeclip.io import UnreadableFileError

    extras = {
        "input_resolution": torch.tensor(32),
        "context_length": torch.tensor(24),
        "vocab_size": torch.tensor(49408),
    }
    original = tmp_path / "ViT-tiny.pt"
    _torchscript_archive({**vit.model.state_dict(), **extras}, original)
    with pytest.raises(UnreadableFileError) as info:
        build_backbone("tiny-vit", pretrained=str(original))
    message = str(info.value)
    assert "\n" not in message and "TorchScript" in message and "can run code" in message
    # the command the message names converts the file; the result loads
    command = message.split("convert it once: ", 1)[1].split(" and pass --pretrained ")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exec(compile(argv[2], "<the command in the message>", "exec"), {})  # what python -c runs
    converted = Path(message.split(" and pass --pretrained ", 1)[1].split(" ")[0])
    assert converted.is_file() and converted.parent == tmp_path
    loaded = build_backbone("tiny-vit", pretrained=str(converted), seed=123)
    assert loaded.fingerprint == vit.fingerprint  # OpenAI's extra keys dropped
    _same_readings(loaded, vit)


def test_torch_save_archive_is_not_mistaken_for_torchscript(vit, tmp_path):
    from seeclip.backbone import _is_torchscript

    path = tmp_path / "plain.pt"
    torch.save(dict(vit.model.state_dict()), path)
    assert not _is_torchscript(path)
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert not _is_torchscript(tmp_path / "junk.pt")


@pytest.fixture
def custom_text_arch(vit, monkeypatch):
    """tiny-vit built as open_clip's CustomTextCLIP (the text tower under ``model.text``)."""
    import open_clip.factory

    import seeclip.backbone as backbone_module

    backbone_module._register_configs()  # before adding: it rescans open_clip's configs
    cfg = json.loads((CONFIGS / "tiny-vit.json").read_text())
    name = "tiny-vit-custom-text-test"
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, {**cfg, "custom_text": True})
    return name


def test_clip_layout_checkpoint_loads_into_a_custom_text_model(vit, custom_text_arch, tmp_path):
    """open_clip moved the text tower of some models under ``text.``; a checkpoint saved with
    the flat CLIP layout (``positional_embedding``, ``transformer.*``, ...) is converted."""
    random = build_backbone(custom_text_arch, seed=0)
    assert type(random.model).__name__ == "CustomTextCLIP"
    own = set(random.model.state_dict())
    flat = dict(vit.model.state_dict())
    assert "text.positional_embedding" in own and "positional_embedding" in flat
    assert not set(flat) & {k for k in own if k.startswith("text.")}  # the layouts differ
    path = tmp_path / "flat.safetensors"
    save_file(flat, str(path))
    loaded = build_backbone(custom_text_arch, pretrained=str(path), seed=7)
    expected = {(f"text.{k}" if k in _text_keys(flat) else k): v for k, v in flat.items()}
    got = loaded.model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    _same_readings(loaded, vit)


def _text_keys(state: dict) -> set[str]:
    """The keys of CLIP's flat text tower."""
    heads = (
        "positional_embedding",
        "token_embedding.",
        "transformer.",
        "ln_final.",
        "text_projection",
    )
    return {k for k in state if k.startswith(heads)}


@pytest.mark.parametrize("name", ["tiny-digits", "tiny-glyphs"])
def test_missing_shipped_weights_name_the_fix(name, tmp_path, monkeypatch):
    import dataclasses

    from seeclip.zoo.pretrain import WORLDS

    spec = BACKBONES.get(name)
    assert spec.weights is not None and spec.weights.is_file()
    absent = tmp_path / f"{name}.safetensors"
    monkeypatch.setitem(BACKBONES._entries, name, dataclasses.replace(spec, weights=absent))
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone(name)
    message = str(info.value)
    assert "\n" not in message and str(absent) in message and "missing" in message
    world = name.removeprefix("tiny-")
    assert f"seeclip pretrain-clip --world {world} --out DIR" in message
    assert f"--pretrained DIR/{name}.safetensors" in message
    assert WORLDS[world].model == name  # the world named trains exactly this model
    # an explicit checkpoint needs no shipped file
    state = tmp_path / "given.safetensors"
    save_file(dict(build_backbone(f"{name}-random").model.state_dict()), str(state))
    assert build_backbone(name, pretrained=str(state)).pretrained == str(state)


@pytest.mark.parametrize("pretrained", ["weights.safetensors", "openai"])
def test_hf_hub_name_with_pretrained_is_refused_before_any_lookup(
    vit, pretrained, tmp_path, monkeypatch
):
    def no_lookup(*args, **kwargs):
        raise AssertionError("the hub was consulted")

    monkeypatch.setattr(hub, "resolve_hf_hub_name", no_lookup)
    monkeypatch.setattr(hub, "_require_network", no_lookup)
    if pretrained.endswith(".safetensors"):
        pretrained = str(tmp_path / pretrained)
        save_file(dict(vit.model.state_dict()), pretrained)
    with pytest.raises(
        ValueError,
        match=r"hf-hub:org/model: an hf-hub: name brings its own "
        r"weights; drop --pretrained",
    ):
        build_backbone("hf-hub:org/model", pretrained=pretrained)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty HF cache and a socket layer that refuses every connection."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    return tmp_path / "hf"


@pytest.fixture
def no_download(monkeypatch):
    """Records any call of open_clip's or huggingface_hub's downloaders (none may happen)."""
    import huggingface_hub
    import open_clip.factory
    import open_clip.pretrained

    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a download was attempted")

    for module, name in [
        (open_clip.factory, "download_pretrained"),
        (open_clip.factory, "download_pretrained_from_hf"),
        (open_clip.pretrained, "download_pretrained"),
        (open_clip.pretrained, "download_pretrained_from_hf"),
        (open_clip.pretrained, "download_pretrained_from_url"),
        (open_clip.pretrained, "hf_hub_download"),
        (huggingface_hub, "hf_hub_download"),
    ]:
        monkeypatch.setattr(module, name, record)
    return calls


@pytest.mark.parametrize("offline_env", ["1", ""])
def test_missing_weights_fail_fast(no_network, no_download, monkeypatch, offline_env):
    """Failing fast means: no download is tried, and the one network probe (only when not
    offline) is a single connection attempt with the probe's short timeout."""
    attempts = []

    def refuse(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    for name, tag in [("ViT-B-16", "openai"), ("RN50", "openai"), ("hf-hub:org/model", None)]:
        attempts.clear()
        with pytest.raises(WeightsUnavailableError) as info:
            build_backbone(name, pretrained=tag)
        message = str(info.value)
        assert name in message and "network is unreachable" in message
        assert "--pretrained /path/to/checkpoint.safetensors" in message
        assert str(no_network) in message and "\n" not in message
        reason = "HF_HUB_OFFLINE is set" if offline_env else "network disabled in tests"
        assert reason in message
        if offline_env:
            assert attempts == []  # offline: not even a probe
        else:
            assert len(attempts) == 1 and attempts[0][1] == hub._PROBE_TIMEOUT_S <= 3.0
            assert attempts[0][0][1] == 443
    assert no_download == []


def test_a_hanging_probe_is_abandoned_after_its_timeout(no_network, no_download, monkeypatch):
    """A connection (or DNS lookup) that never answers does not hold the caller: the probe
    runs in a daemon thread that the caller stops waiting for."""
    import threading

    release, started = threading.Event(), threading.Event()

    def hang(*args, **kwargs):
        started.set()
        release.wait()  # until the test ends: the probe must not wait for this
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(hub, "_PROBE_TIMEOUT_S", 0.01)
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    try:
        with pytest.raises(WeightsUnavailableError, match=r"no answer from \S+ in 0.01s"):
            build_backbone("ViT-B-16", pretrained="openai")
        assert started.is_set()
    finally:
        release.set()
    assert no_download == []


def _fake_hf_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: refs/main names the snapshot holding the files."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    snapshot = base / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def _safetensors_bytes(backbone, tmp_path: Path) -> bytes:
    path = tmp_path / "w.safetensors"
    save_file(dict(backbone.model.state_dict()), str(path))
    return path.read_bytes()


def test_cached_tag_loads_offline(vit, no_network, monkeypatch, tmp_path):
    cfg = {"hf_hub": "seeclip-test/tiny-vit/", "mean": (0.5,) * 3, "std": (0.25,) * 3}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda arch, tag: cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = _safetensors_bytes(vit, tmp_path)
    _fake_hf_repo(no_network, "seeclip-test/tiny-vit", {"open_clip_model.safetensors": weights})
    loaded = build_backbone("tiny-vit", pretrained="testtag", seed=5)
    assert loaded.fingerprint == vit.fingerprint and loaded.pretrained == "testtag"
    assert "mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)" in repr(loaded.preprocess)


def test_cached_hf_hub_model_loads_offline(vit, no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = {"model_cfg": json.loads((CONFIGS / "tiny-vit.json").read_text())}
    files = {
        "open_clip_config.json": json.dumps(config).encode(),
        "open_clip_model.safetensors": _safetensors_bytes(vit, tmp_path),
    }
    _fake_hf_repo(no_network, "seeclip-test/tiny", files)
    loaded = build_backbone("hf-hub:seeclip-test/tiny", seed=5)
    assert loaded.arch == "hf-hub:seeclip-test/tiny" and loaded.context_length == 24
    images = _images(vit)
    assert torch.equal(loaded.encode_image(images)[1], vit.encode_image(images)[1])
    assert torch.equal(loaded.encode_text(PROMPTS), vit.encode_text(PROMPTS))


def test_unknown_names_suggest_alternatives():
    with pytest.raises(ValueError, match="did you mean: ViT-B-16"):
        build_backbone("ViT-B16")
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'nope' for ViT-B-16.*openai"):
        build_backbone("ViT-B-16", pretrained="nope")


def test_list_backbones_covers_registry():
    rows = dict(list_backbones())
    assert set(BACKBONES) <= set(rows)
    assert any("ViT-B-16" in text and "openai" in text for text in rows.values())


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-glyphs"])
def test_last_text_block_at_the_end_token_is_exact(name, monkeypatch):
    import seeclip.backbone as backbone_module

    bb = build_backbone(name)
    bb.model.double()
    ids = bb.tokenize(["a photo of a dog.", "a hot dog stand in the rain.", "x"])
    eot = bb.eot_index(ids)
    weights = torch.randn(3, bb.embed_dim, dtype=torch.float64)
    out = {}
    for fast in (False, True):  # ends with the default on
        monkeypatch.setattr(backbone_module, "EOT_ONLY_LAST_BLOCK", fast)
        emb = bb.embed_tokens(ids).double().requires_grad_(True)
        feats = bb.encode_text_embeddings(emb, eot)
        out[fast] = (feats, torch.autograd.grad((feats * weights).sum(), emb)[0])
    assert backbone_module._eot_only_ok(bb._text.transformer)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-10, atol=1e-10)
