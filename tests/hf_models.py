"""Tiny random transformers T5-family models for parity tests (no downloads).

Each variant is written to a directory in one of two styles:
- ``"hf"``: by transformers' own ``save_pretrained`` (whatever version is installed);
- ``"v4"``: as transformers v4 wrote real checkpoints (``tie_word_embeddings`` false and an
  explicit ``lm_head.weight`` for untied models, no ``scale_decoder_outputs`` key), which is how
  Flan-T5 / mT5 / UMT5 / ByT5 checkpoints on the Hub look.
The reference model is always what transformers loads back from that directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SMALL = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=24,
             dropout_rate=0.0, decoder_start_token_id=0)

# name -> (model_type, config overrides, untied head)
VARIANTS = {
    "t5-v1_0": ("t5", dict(feed_forward_proj="relu"), False),
    "t5-v1_1": ("t5", dict(feed_forward_proj="gated-gelu"), True),
    "mt5": ("mt5", dict(feed_forward_proj="gated-gelu"), True),
    "umt5": ("umt5", dict(feed_forward_proj="gated-gelu"), True),
    "umt5-tied": ("umt5", dict(feed_forward_proj="gated-gelu"), False),
    "byt5": ("t5", dict(feed_forward_proj="gated-gelu", vocab_size=384, num_layers=3,
                        num_decoder_layers=1), True),
    # num_heads * d_kv != d_model, num_decoder_layers > num_layers, gated-SiLU, other buckets
    "odd-shapes": ("t5", dict(feed_forward_proj="gated-silu", d_model=24, d_kv=10, num_heads=3,
                              num_layers=1, num_decoder_layers=3,
                              relative_attention_num_buckets=16,
                              relative_attention_max_distance=40), True),
    # LongT5 (untied, v1.1-style; and tied with scaling): radius 5 -> blocks of 6 and global
    # blocks of 4, so inputs() lengths 37/27/12 leave partial local blocks and orphan tokens.
    "longt5-local": ("longt5", dict(feed_forward_proj="gated-gelu", encoder_attention_type="local",
                                    local_radius=5), True),
    "longt5-tglobal": ("longt5", dict(feed_forward_proj="gated-gelu", local_radius=5,
                                      encoder_attention_type="transient-global",
                                      global_block_size=4), True),
    # A large epsilon: RMSNorm is scale-invariant up to it, so only then does a block MEAN
    # instead of transformers' SUM (_create_global_aggregates) change the logits.
    "longt5-tglobal-tied": ("longt5", dict(feed_forward_proj="relu", local_radius=3,
                                           encoder_attention_type="transient-global",
                                           global_block_size=5, layer_norm_epsilon=0.5), False),
}


def hf_classes(model_type: str):
    import transformers as tr
    return {
        "t5": (tr.T5Config, tr.T5ForConditionalGeneration, tr.T5EncoderModel),
        "mt5": (tr.MT5Config, tr.MT5ForConditionalGeneration, tr.MT5EncoderModel),
        "umt5": (tr.UMT5Config, tr.UMT5ForConditionalGeneration, tr.UMT5EncoderModel),
        "longt5": (tr.LongT5Config, tr.LongT5ForConditionalGeneration, tr.LongT5EncoderModel),
    }[model_type]


def build(variant: str, path, *, style: str = "v4", seed: int = 0):
    """Write ``variant`` to ``path``; return transformers' model loaded back from it (eval mode)."""
    import torch
    from safetensors.numpy import save_file

    model_type, overrides, untied = VARIANTS[variant]
    Config, Model, _ = hf_classes(model_type)
    kw = {**SMALL, **overrides}
    torch.manual_seed(seed)
    cfg = Config(**kw, tie_word_embeddings=not untied)
    model = Model(cfg).eval()
    with torch.no_grad():  # make norms and biases non-trivial (init leaves norms at 1)
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    if untied:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    path = Path(path)
    if style == "hf":
        model.save_pretrained(path)
    else:
        sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
              if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
        if not untied:
            sd.pop("lm_head.weight", None)
        path.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        raw = {**kw, "model_type": model_type, "architectures": [Model.__name__],
               "tie_word_embeddings": not untied, "is_encoder_decoder": True,
               "transformers_version": "4.46.0"}
        raw.setdefault("num_decoder_layers", kw["num_layers"])
        (path / "config.json").write_text(json.dumps(raw))
    return Model.from_pretrained(path).eval()


def original_scaling(variant: str) -> bool:
    """Whether the variant's original model scales the decoder output by d_model**-0.5 before its
    head: the tied-head models (T5 v1.0, a tied UMT5); never an untied head (t5x)."""
    return not VARIANTS[variant][2]


def applied_scaling(model, logits, decoder_hidden) -> bool:
    """Which scaling transformers applied, read off its own computation: its logits against its
    own head on its own decoder output, with and without the factor. Raises if neither fits."""
    import torch

    with torch.no_grad():
        plain = torch.nn.functional.linear(decoder_hidden, model.lm_head.weight).float().numpy()
    scaled = plain * model.config.d_model ** -0.5
    err = {s: float(np.max(np.abs(logits - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
           for s, ref in ((False, plain), (True, scaled))}
    best = min(err, key=err.get)
    if not (err[best] < 0.05 and err[not best] > 0.5):  # the factor is >= 2 for d_model >= 4
        raise AssertionError(f"transformers' logits match neither the scaled nor the unscaled head "
                             f"(relative errors {err}): the oracle cannot tell what it computed")
    return best


def hf_reference_logits(model, variant_or_scaled, input_ids, attention_mask, decoder_input_ids,
                        decoder_attention_mask=None):
    """transformers' logits, with the decoder-output scaling the checkpoint means.

    ``variant_or_scaled``: a variant name (its original model's scaling, ``original_scaling``) or
    the scaling as a bool. Versions of transformers disagree on that one scalar for some files
    (5.0-5.23 scale an untied UMT5, v4, 5.24 and t5x do not), so the oracle decides what the
    installed transformers did from its own outputs (``applied_scaling``), not from its version
    number, and converts by the exact factor if that differs; everything else is transformers'.
    """
    import torch

    want = (original_scaling(variant_or_scaled) if isinstance(variant_or_scaled, str)
            else bool(variant_or_scaled))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(input_ids),
                    attention_mask=torch.as_tensor(attention_mask),
                    decoder_input_ids=torch.as_tensor(decoder_input_ids),
                    decoder_attention_mask=(None if decoder_attention_mask is None
                                            else torch.as_tensor(decoder_attention_mask)),
                    output_hidden_states=True)
    logits = out.logits.float().numpy()
    got = applied_scaling(model, logits, out.decoder_hidden_states[-1])
    if got != want:
        factor = model.config.d_model ** -0.5
        logits = logits * factor if want else logits / factor
    return logits


def inputs(vocab: int, *, batch=3, enc_len=37, dec_len=23, seed=0):
    """Random ids with padding: row 1 has 10 pad positions, row 2 has 25 (encoder)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (batch, enc_len)).astype(np.int64)
    mask = np.ones((batch, enc_len), np.int64)
    mask[1, enc_len - 10:] = 0
    if batch > 2:
        mask[2, enc_len - 25:] = 0
    ids[mask == 0] = 0
    dec = rng.integers(2, vocab, (batch, dec_len)).astype(np.int64)
    dec[:, 0] = 0  # decoder start token
    return ids, mask, dec
