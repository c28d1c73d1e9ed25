"""LongT5 (local / transient-global) against transformers, and local attention on T5 checkpoints.

Logit parity and bit-exact round trips of the LongT5 variants run in test_parity.py and
test_bridge.py (they are in ``hf_models.VARIANTS``); here: exports, greedy generation, the
global-block rule, the scaling rule per writer, Pallas vs XLA, and the long-input approximation.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import jt5  # noqa: E402
from jt5.bridge import read_config  # noqa: E402
from jt5.bridge.keymap import config_from_hf  # noqa: E402
from jt5 import longt5  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

LONGT5 = [n for n, v in hf_models.VARIANTS.items() if v[0] == "longt5"]


@nnx.jit
def _forward(model, ids, dec, mask):
    return model(ids, dec, mask)


@nnx.jit
def _encode(model, ids, mask):
    return model.encode(ids, mask)


# -- the global-block rule --------------------------------------------------------------------
@pytest.mark.parametrize("block,length", [(16, 16384), (25, 16384), (4, 37), (5, 12), (3, 2)])
def test_global_block_ids_match_transformers(block, length):
    """Block ids (incl. orphans, padding and the float rounding of non-power-of-two blocks at
    long lengths) and valid global blocks equal modeling_longt5's _make_global_fixed_block_ids."""
    import torch
    from transformers.models.longt5.modeling_longt5 import _make_global_fixed_block_ids

    rng = np.random.default_rng(block)
    mask = np.ones((4, length), np.int64)
    mask[1, length // 2:] = 0
    mask[2, max(length - block - 1, 1):] = 0
    mask[3, :] = 0
    mask[3, 0] = 1
    if length > 100:
        mask[0, rng.integers(0, length, 50)] = 0  # holes
    ref_ids, ref_valid = _make_global_fixed_block_ids(torch.as_tensor(mask), block)
    ids, valid = longt5.global_block_ids(jnp.asarray(mask != 0), block)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids.numpy())
    np.testing.assert_array_equal(np.asarray(valid), ref_valid.numpy() == 1)


# -- the decoder-output scaling rule, per writer (cf. WRITERS in test_bridge.py) ---------------
LONGT5_WRITERS = [
    # (writer, keys the writer puts in config.json, the writer's scaling); read off each version's
    # configuration_longt5.py / modeling_longt5.py (4.57.1, 5.0.0, 5.23.0, 5.24.0)
    ("4.46 LongT5 (every released checkpoint)", {"tie_word_embeddings": False}, False),
    ("4.46 LongT5", {}, True),                                    # v4 default: tied, scaled
    ("4.46 LongT5 tied", {"tie_word_embeddings": True}, True),
    ("5.0 LongT5", {"tie_word_embeddings": False}, False),        # 5.0: still v4's rule
    ("5.0 LongT5 tied", {"tie_word_embeddings": True}, True),
    ("5.23 LongT5", {"tie_word_embeddings": True, "scale_decoder_outputs": False}, False),
    ("5.23 LongT5 tied", {"tie_word_embeddings": True, "scale_decoder_outputs": True}, True),
    ("5.24 LongT5", {"tie_word_embeddings": True, "scale_decoder_outputs": False}, False),
    ("5.24 LongT5 tied", {"tie_word_embeddings": True, "scale_decoder_outputs": True}, True),
    ("jt5 export", {"tie_word_embeddings": False, "scale_decoder_outputs": False}, False),
]


@pytest.mark.parametrize("writer,keys,scaled", LONGT5_WRITERS,
                         ids=[f"{w}-{sorted(k.items())}" for w, k, _ in LONGT5_WRITERS])
def test_longt5_scaling_per_writer_version(writer, keys, scaled):
    raw = {"d_model": 8, "num_heads": 2, "d_kv": 4, "model_type": "longt5",
           "encoder_attention_type": "transient-global", **keys}
    if not writer.startswith("jt5"):
        raw["transformers_version"] = writer.split()[0] + ".0"
    c = config_from_hf(raw, has_lm_head=True)
    assert c.scale_decoder_outputs is scaled, (writer, raw)
    assert (c.encoder_attention_type, c.local_radius, c.global_block_size) == (
        "transient-global", 127, 16)


@pytest.mark.parametrize("name", LONGT5)
def test_installed_transformers_own_files_scale_as_it_computes(name, tmp_path):
    import torch
    hf = hf_models.build(name, tmp_path, style="hf")
    ids, mask, dec = hf_models.inputs(hf.config.vocab_size, batch=2)
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                 decoder_input_ids=torch.as_tensor(dec), output_hidden_states=True)
    applied = hf_models.applied_scaling(hf, out.logits.numpy(), out.decoder_hidden_states[-1])
    assert config_from_hf(read_config(tmp_path), has_lm_head=True).scale_decoder_outputs is applied


# -- exports and generation -------------------------------------------------------------------
@pytest.mark.parametrize("name,style", [(n, s) for n in LONGT5 for s in ("v4", "hf")])
def test_export_loads_in_transformers_longt5(name, style, tmp_path):
    hf_models.build(name, tmp_path / "src", style=style)
    model = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "src", attention="xla")
    model.save_pretrained(tmp_path / "dst")
    raw = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert raw["architectures"] == ["LongT5ForConditionalGeneration"]
    assert raw["encoder_attention_type"] == model.config.encoder_attention_type
    _, Model, Encoder = hf_models.hf_classes("longt5")
    reloaded = Model.from_pretrained(tmp_path / "dst").eval()
    ids, mask, dec = hf_models.inputs(model.config.vocab_size)
    ref = hf_models.hf_reference_logits(reloaded, name, ids, mask, dec)
    out = _forward(model, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask))
    assert_close(out, ref, dtype="float32", check="logits", what=f"{name}/{style} export")
    # the same file read back by jt5 is the same model, bit for bit
    again = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "dst", attention="xla")
    assert again.config == model.config
    np.testing.assert_array_equal(
        _forward(again, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask)), out)


def test_encoder_export_loads_as_longt5_encoder(tmp_path):
    import torch
    hf_models.build("longt5-tglobal", tmp_path / "src")
    enc = jt5.T5EncoderModel.from_pretrained(tmp_path / "src", attention="xla")
    enc.save_pretrained(tmp_path / "dst")
    _, _, Encoder = hf_models.hf_classes("longt5")
    hf = Encoder.from_pretrained(tmp_path / "dst").eval()
    assert type(hf).__name__ == "LongT5EncoderModel"
    ids, mask, _ = hf_models.inputs(enc.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids),
                 attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()
    keep = mask[..., None] != 0  # padded queries are undefined in LongT5 (see test_parity)
    out = np.asarray(enc(jnp.asarray(ids), jnp.asarray(mask)))
    assert_close(np.where(keep, out, 0), np.where(keep, ref, 0), dtype="float32", check="hidden",
                 what="LongT5 encoder export")


@pytest.mark.parametrize("name", ["longt5-local", "longt5-tglobal"])
def test_greedy_generate_matches_transformers(name, tmp_path):
    """Token for token; 37-token inputs run in jt5's 64 bucket (extra padding changes nothing)."""
    import torch
    hf = hf_models.build(name, tmp_path)
    model = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, attention="xla")
    ids, mask, _ = hf_models.inputs(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                          max_new_tokens=12, do_sample=False, num_beams=1, pad_token_id=0,
                          eos_token_id=1).numpy()
    ours = np.asarray(model.generate(ids, mask, max_new_tokens=12, eos_token_id=1,
                                     pad_token_id=0))
    ours = ours[:, :ref.shape[1]] if (ours[:, ref.shape[1]:] == 0).all() else ours
    assert ours.shape == ref.shape and (ours == ref).all(), f"\nours\n{ours}\nref\n{ref}"


# -- Pallas ------------------------------------------------------------------------------------
def _tiny(attention, **kw):
    cfg = jt5.preset("tiny", attention=attention, d_model=32, num_heads=2, d_kv=16, d_ff=32,
                     num_layers=2, num_decoder_layers=1, relative_attention_max_distance=20, **kw)
    return jt5.init_model(cfg, seed=3)


def _batch(B=2, S=45, T=7):
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 384, (B, S))
    mask = np.ones((B, S), np.int32)
    mask[1, 29:] = 0
    dec = rng.integers(2, 384, (B, T))
    return tuple(map(jnp.asarray, (ids, dec, mask)))


@pytest.mark.parametrize("kw", [
    dict(encoder_attention_type="local", local_radius=6),
    dict(encoder_attention_type="local", local_radius=4, num_global_tokens=3),
    dict(model_type="longt5", encoder_attention_type="transient-global", local_radius=6,
         global_block_size=4),  # the encoder falls back to the dense path; the decoder is Pallas
], ids=["local", "local+global-tokens", "tglobal-fallback"])
def test_pallas_equals_xla(kw):
    ids, dec, mask = _batch()
    out = {impl: _forward(_tiny(impl, **kw), ids, dec, mask) for impl in ("xla", "pallas")}
    assert_close(out["pallas"], out["xla"], dtype="float32", check="logits", what=str(kw))


# -- long-input approximation on T5 checkpoints ------------------------------------------------
def test_t5_checkpoint_with_local_attention_equals_longt5_local(tmp_path):
    """A T5 checkpoint run with ``encoder_attention_type="local"`` is exactly transformers'
    LongT5-local holding the same weights (only the encoder module name differs)."""
    hf_models.build("t5-v1_1", tmp_path / "t5")
    sd = load_file(str(tmp_path / "t5" / "model.safetensors"))
    sd = {k.replace("layer.0.SelfAttention", "layer.0.LocalSelfAttention")
          if k.startswith("encoder.") else k: v for k, v in sd.items()}
    raw = json.loads((tmp_path / "t5" / "config.json").read_text())
    raw.update(model_type="longt5", architectures=["LongT5ForConditionalGeneration"],
               encoder_attention_type="local", local_radius=4)
    (tmp_path / "lt5").mkdir()
    save_file(sd, str(tmp_path / "lt5" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "lt5" / "config.json").write_text(json.dumps(raw))
    _, Model, _ = hf_models.hf_classes("longt5")
    hf = Model.from_pretrained(tmp_path / "lt5").eval()
    ids, mask, dec = hf_models.inputs(hf.config.vocab_size)
    ref = hf_models.hf_reference_logits(hf, "t5-v1_1", ids, mask, dec)
    model = jt5.T5ForConditionalGeneration.from_pretrained(
        tmp_path / "t5", attention="xla", encoder_attention_type="local", local_radius=4)
    out = _forward(model, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask))
    assert_close(out, ref, dtype="float32", check="logits", what="T5 + local = LongT5-local")
    full = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", attention="xla")
    wide = jt5.T5ForConditionalGeneration.from_pretrained(
        tmp_path / "t5", attention="xla", encoder_attention_type="local", local_radius=36)
    args = (jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask))
    # a radius covering the input is full attention; a small one is not
    assert_close(_forward(wide, *args), _forward(full, *args), dtype="float32", check="logits",
                 what="radius >= length")
    assert not np.allclose(np.asarray(out), np.asarray(_forward(full, *args)), atol=1e-3)
    model.save_pretrained(tmp_path / "out")  # the approximation is not part of the checkpoint
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "t5"


def test_global_tokens_reach_across_the_window():
    """Radius 2, two layers: without global tokens position 20 cannot see token 40; with the
    first 3 tokens global it does (token 40 -> global tokens -> position 20)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(2, 384, (1, 48))
    other = ids.copy()
    other[0, 40] = (ids[0, 40] + 7) % 384
    for g, reaches in ((0, False), (3, True)):
        model = _tiny("xla", encoder_attention_type="local", local_radius=2, num_global_tokens=g)
        a, b = (np.asarray(_encode(model, jnp.asarray(x), None)) for x in (ids, other))
        assert bool(np.abs(a[0, 20] - b[0, 20]).max() > 1e-6) is reaches, g
        assert np.abs(a[0, 0] - b[0, 0]).max() > 1e-6 if g else (a[0, :30] == b[0, :30]).all()


def _t5_as_longt5_tglobal(t5_dir, out_dir, model, *, local_radius, global_block_size):
    """transformers' LongT5-tglobal directory holding ``t5_dir``'s weights plus ``model``'s
    (jt5's) global bias table and global norm scales."""
    sd = load_file(str(t5_dir / "model.safetensors"))
    attn = "TransientGlobalSelfAttention"
    sd = {k.replace("layer.0.SelfAttention", f"layer.0.{attn}")
          if k.startswith("encoder.") else k: v for k, v in sd.items()}
    enc = model.encoder
    sd[f"encoder.block.0.layer.0.{attn}.global_relative_attention_bias.weight"] = np.asarray(
        enc.global_relpos.table[...])
    for i, layer in enumerate(enc.layers):
        sd[f"encoder.block.{i}.layer.0.{attn}.global_input_layer_norm.weight"] = np.asarray(
            layer.self_attn.global_norm.scale[...])
    raw = json.loads((t5_dir / "config.json").read_text())
    raw.update(model_type="longt5", architectures=["LongT5ForConditionalGeneration"],
               encoder_attention_type="transient-global", local_radius=local_radius,
               global_block_size=global_block_size)
    out_dir.mkdir()
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(raw))
    _, Model, _ = hf_models.hf_classes("longt5")
    return Model.from_pretrained(out_dir).eval()


@pytest.mark.parametrize("radius,block", [(4, 4), (6, 3)])
def test_t5_checkpoint_with_transient_global_equals_longt5_tglobal(tmp_path, radius, block):
    """A T5 checkpoint loaded with ``encoder_attention_type="transient-global"`` is exactly
    transformers' LongT5-tglobal holding the same weights and the global table / norms jt5
    initialised; those come from the checkpoint's own table and norms (global_bucket_rows)."""
    hf_models.build("t5-v1_1", tmp_path / "t5")
    model = jt5.T5ForConditionalGeneration.from_pretrained(
        tmp_path / "t5", attention="xla", encoder_attention_type="transient-global",
        local_radius=radius, global_block_size=block)
    c = model.config
    assert (c.model_type, c.encoder_attention_type, c.local_radius, c.global_block_size) == (
        "t5", "transient-global", radius, block)
    hf = _t5_as_longt5_tglobal(tmp_path / "t5", tmp_path / "lt5", model, local_radius=radius,
                               global_block_size=block)
    ids, mask, dec = hf_models.inputs(hf.config.vocab_size)
    ref = hf_models.hf_reference_logits(hf, "t5-v1_1", ids, mask, dec)
    args = (jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask))
    out = _forward(model, *args)
    assert_close(out, ref, dtype="float32", check="logits", what="T5 + tglobal = LongT5-tglobal")
    full = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", attention="xla")
    assert not np.allclose(np.asarray(out), np.asarray(_forward(full, *args)), atol=1e-3)
    # every other parameter is the checkpoint's, unchanged
    mine = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for p, v in nnx.to_flat_state(nnx.state(full, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(mine[p].get_value()), np.asarray(v.get_value()))
    # the initialisation, against transformers' bucket rule
    _check_global_init(full, model, block)


def _check_global_init(full, model, block):
    import torch
    from transformers.models.longt5.modeling_longt5 import LongT5Attention

    c = model.config
    K, M = c.relative_attention_num_buckets, c.relative_attention_max_distance

    def bucket(d):
        return LongT5Attention._relative_position_bucket(
            torch.as_tensor(np.asarray(d)), bidirectional=True, num_buckets=K,
            max_distance=M).numpy()

    table = np.asarray(full.encoder.relpos.table[...])
    glob = np.asarray(model.encoder.global_relpos.table[...])
    rows = longt5.global_bucket_rows(num_buckets=K, max_distance=M, global_block_size=block)
    d = np.arange(-3 * M, 3 * M + 1)
    for b in np.unique(bucket(d)):
        ds = d[bucket(d) == b]
        if ds.size == 1:  # an exact bucket: the token distance d * g itself
            np.testing.assert_array_equal(glob[b], table[bucket(ds[0] * block)])
        else:  # a log bucket: the row of a block distance the bucket holds, times g
            assert rows[b] in set(bucket(ds * block).tolist()), (b, rows[b])
            np.testing.assert_array_equal(glob[b], table[rows[b]])
    for lf, lt in zip(full.encoder.layers, model.encoder.layers):
        s = np.asarray(lf.self_attn_norm.scale[...], np.float64)
        np.testing.assert_allclose(np.asarray(lt.self_attn.global_norm.scale[...]),
                                   np.sqrt(np.mean(s**2)), rtol=1e-6)


def test_transient_global_conversion_keeps_a_tglobal_checkpoint(tmp_path):
    """A LongT5-tglobal checkpoint keeps its trained global parameters under the override."""
    hf_models.build("longt5-tglobal", tmp_path)
    stored = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, attention="xla")
    again = jt5.T5ForConditionalGeneration.from_pretrained(
        tmp_path, attention="xla", encoder_attention_type="transient-global", local_radius=3)
    assert again.config == stored.config.replace(local_radius=3)
    for a, b in zip(nnx.to_flat_state(nnx.state(stored, nnx.Param)),
                    nnx.to_flat_state(nnx.state(again, nnx.Param))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1].get_value()), np.asarray(b[1].get_value()))


def test_transient_global_is_refused_with_per_layer_bias(tmp_path):
    hf_models.build("umt5", tmp_path)
    with pytest.raises(ValueError, match="transient-global.*one shared relative bias table"):
        jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, attention="xla",
                                                       encoder_attention_type="transient-global")
    with pytest.raises(ValueError, match="num_global_tokens=2 applies to .*'local' only"):
        jt5.preset("tiny", num_global_tokens=2)


@pytest.mark.parametrize("name", [n for n in jt5.PRESETS if n.startswith("long-t5")])
def test_presets_map_to_longt5_files(name):
    """Every parameter of a LongT5 preset has one transformers key, and its config.json reads
    back as the same architecture (no arrays are allocated)."""
    from jt5.bridge.keymap import config_to_hf, rules
    cfg = jt5.preset(name)
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(jt5.abstract_model(cfg), nnx.Param))}
    mapped = [r.jt5 for r in rules(cfg)]
    assert len(mapped) == len(set(mapped)) and set(mapped) == paths
    raw = config_to_hf(cfg, head_written=True)
    assert raw["architectures"] == ["LongT5ForConditionalGeneration"]
    assert config_from_hf(raw, has_lm_head=True) == cfg
