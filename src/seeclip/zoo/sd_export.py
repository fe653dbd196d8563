"""open_clip's text tower as a Hugging Face ``CLIPTextModel`` + ``CLIPTokenizer`` (for diffusers).

Stable Diffusion 1.x is conditioned on the last hidden states of CLIP ViT-L's text encoder, read
through ``transformers``. :func:`text_encoder_from_clip` copies a (tiny) open_clip CLIP's text
tower into a ``CLIPTextModel`` of the same widths, and :func:`clip_tokenizer` builds the matching
``CLIPTokenizer`` offline from open_clip's own BPE file, so a ``StableDiffusionPipeline`` made
with them encodes prompts exactly as the open_clip model does (same ids up to the end token,
same per-position features, same pooled feature). transformers is imported lazily (it comes
with the ``diffusion`` extra).
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["BOS", "EOS", "clip_tokenizer", "text_encoder_from_clip", "write_tokenizer"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # open_clip calls them <start_of_text>/<end_of_text>
_N_MERGES = 49152 - 256 - 2  # open_clip's SimpleTokenizer reads lines [1, 48895) of the BPE file


def _bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """open_clip's encoder table (token -> id) and BPE merges, built as SimpleTokenizer does."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = list(bytes_to_unicode().values())  # byte order, not sorted: the ids depend on it
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [" ".join(m) for m in merges]


def write_tokenizer(folder: Path | str, context_length: int) -> Path:
    """Write open_clip's tokenizer as SD-1.5's ``tokenizer/`` folder (vocab, merges, config).

    The files are the ones a slow or fast ``CLIPTokenizer`` loads in transformers 4 and 5
    (about 1.5 MB; a ``tokenizer.json`` would add 3.6 MB to a pipeline folder).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _bpe_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def clip_tokenizer(context_length: int):
    """A ``CLIPTokenizer`` with open_clip's vocabulary (49408 ids), built without download.

    ``model_max_length`` is ``context_length`` and the pad token is ``<|endoftext|>``, as in
    SD-1.5's tokenizer; up to the end token its ids equal open_clip's tokenizer's (open_clip pads
    with 0 instead, which a causal text encoder never sees before the end token).
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tokenizer(tmp, context_length)
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _text_tower(model: nn.Module) -> tuple[nn.Module, int, int, int]:
    """(transformer, width, heads, context_length) of an open_clip ``CLIP``'s text tower."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if not all(hasattr(model, a) for a in needed):
        raise TypeError(
            f"text_encoder_from_clip needs an open_clip CLIP with a built-in text transformer, "
            f"got {type(model).__name__}"
        )
    blocks = model.transformer.resblocks
    attn = blocks[0].attn
    if not isinstance(attn, nn.MultiheadAttention) or not isinstance(blocks[0].ls_1, nn.Identity):
        raise TypeError(
            "text_encoder_from_clip supports nn.MultiheadAttention blocks without LayerScale"
        )
    act = blocks[0].mlp.gelu
    if type(act) is not nn.GELU or act.approximate != "none":
        raise TypeError(f"text_encoder_from_clip needs exact nn.GELU, got {act!r}")
    return model.transformer, attn.embed_dim, attn.num_heads, model.positional_embedding.shape[0]


@torch.no_grad()
def text_encoder_from_clip(model: nn.Module):
    """A ``CLIPTextModel`` (float32, eval) holding a copy of open_clip ``model``'s text tower.

    ``last_hidden_state`` is open_clip's ``ln_final(transformer(...))`` at every position and
    ``pooler_output`` (the first end token) times ``model.text_projection`` is
    ``model.encode_text``. The text projection itself is not part of a ``CLIPTextModel``.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    transformer, width, heads, context = _text_tower(model)
    blocks = transformer.resblocks
    vocab, _ = _bpe_vocab_and_merges()
    config = CLIPTextConfig(
        vocab_size=model.token_embedding.num_embeddings,
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        projection_dim=width,
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        max_position_embeddings=context,
        hidden_act="gelu",
        layer_norm_eps=model.ln_final.eps,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    hf = CLIPTextModel(config).eval()
    text = getattr(hf, "text_model", hf)  # transformers 4 nests the modules; 5 does not
    text.embeddings.token_embedding.weight.copy_(model.token_embedding.weight)
    text.embeddings.position_embedding.weight.copy_(model.positional_embedding)
    for src, dst in zip(blocks, text.encoder.layers, strict=True):
        q, k, v = src.attn.in_proj_weight.chunk(3)
        qb, kb, vb = src.attn.in_proj_bias.chunk(3)
        for proj, w, b in (
            (dst.self_attn.q_proj, q, qb),
            (dst.self_attn.k_proj, k, kb),
            (dst.self_attn.v_proj, v, vb),
        ):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        dst.self_attn.out_proj.weight.copy_(src.attn.out_proj.weight)
        dst.self_attn.out_proj.bias.copy_(src.attn.out_proj.bias)
        for a, b in (
            (dst.layer_norm1, src.ln_1),
            (dst.layer_norm2, src.ln_2),
            (dst.mlp.fc1, src.mlp.c_fc),
            (dst.mlp.fc2, src.mlp.c_proj),
        ):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    text.final_layer_norm.weight.copy_(model.ln_final.weight)
    text.final_layer_norm.bias.copy_(model.ln_final.bias)
    return hf
