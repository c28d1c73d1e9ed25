"""LongT5 (local / transient-global) against transformers, and local attention on T5 checkpoints.

Logit parity and bit-exact round trips of the LongT5 variants run in test_parity.py and
test_bridge.py (they are in ``hf_models.VARIANTS``); here: exports, greedy generation, the
global-block rule, the scaling rule per writer, Pallas vs XLA, and the long-input approximation.
"""
from __future__ import annotations

import functools
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
    # the window on the flash kernel, the side keys in jnp, merged through their lse
    dict(model_type="longt5", encoder_attention_type="transient-global", local_radius=6,
         global_block_size=4),
], ids=["local", "local+global-tokens", "tglobal"])
def test_pallas_equals_xla(kw):
    if "global_block_size" in kw:
        assert longt5.global_impl(_tiny("pallas", **kw).config, 45) == "pallas"
    ids, dec, mask = _batch()
    out = {impl: _forward(_tiny(impl, **kw), ids, dec, mask) for impl in ("xla", "pallas")}
    assert_close(out["pallas"], out["xla"], dtype="float32", check="logits", what=str(kw))


def test_pallas_transient_global_gradients_equal_xla():
    """The flash window's lse is differentiable: the merged attention's gradients (every
    encoder parameter, global norms and both tables included) equal the dense XLA plan's."""
    import jax

    kw = dict(model_type="longt5", encoder_attention_type="transient-global", local_radius=6,
              global_block_size=4)
    ids, _, mask = _batch()
    grads = {}
    for impl in ("xla", "pallas"):
        cfg = jt5.preset("tiny", attention=impl, d_model=32, num_heads=2, d_kv=16, d_ff=32,
                         num_layers=2, relative_attention_max_distance=20, **kw)
        model = jt5.init_model(cfg, jt5.T5EncoderModel, seed=3)

        def loss(m):
            return jnp.mean(jnp.sin(m(ids, mask)))
        with jax.default_matmul_precision("highest"):
            g = nnx.jit(nnx.grad(loss))(model)
        grads[impl] = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}
    assert any("global_norm" in str(p) for p in grads["xla"])
    for p, g in grads["xla"].items():
        assert float(np.abs(g).max()) > 0, p
        assert_close(grads["pallas"][p], g, dtype="float32", check="grad", what=str(p))


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
        "longt5", "transient-global", radius, block)
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
    # it saves as the LongT5 checkpoint it is: transformers and jt5 read it back
    model.save_pretrained(tmp_path / "out")
    _, Model, _ = hf_models.hf_classes("longt5")
    again = Model.from_pretrained(tmp_path / "out").eval()
    assert_close(hf_models.hf_reference_logits(again, "t5-v1_1", ids, mask, dec), ref,
                 dtype="float32", check="logits", what="export read by transformers")
    reread = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "out", attention="xla")
    assert reread.config == model.config
    np.testing.assert_array_equal(_forward(reread, *args), out)


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
            want = table[bucket(ds[0] * block)]
        else:  # a log bucket: the row of a block distance the bucket holds, times g
            assert rows[b] in set(bucket(ds * block).tolist()), (b, rows[b])
            want = table[rows[b]]
        np.testing.assert_array_equal(glob[b], want)
    for layer in model.encoder.layers:  # unit RMS side inputs
        np.testing.assert_array_equal(np.asarray(layer.self_attn.global_norm.scale[...]), 1.0)


@pytest.mark.parametrize("bias,norm", [("mass", "rms"), ("distance", "scale")])
def test_transient_global_init_options(tmp_path, bias, norm):
    """The alternatives benchmarks/long_input.py measured: + log(g), and the norm at the RMS of
    the layer's attention-norm scale or at that scale."""
    hf_models.build("t5-v1_1", tmp_path)
    kw = dict(attention="xla", encoder_attention_type="transient-global", global_block_size=4)
    base = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, **kw)
    alt = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, global_bias_init=bias,
                                                         global_norm_init=norm, **kw)
    shift = np.log(4) if bias == "mass" else 0.0
    np.testing.assert_allclose(np.asarray(alt.encoder.global_relpos.table[...]),
                               np.asarray(base.encoder.global_relpos.table[...]) + shift,
                               rtol=1e-6)
    for layer in alt.encoder.layers:
        s = np.asarray(layer.self_attn_norm.scale[...], np.float64)
        want = np.sqrt(np.mean(s**2)) if norm == "rms" else s
        np.testing.assert_allclose(np.asarray(layer.self_attn.global_norm.scale[...]),
                                   np.broadcast_to(want, s.shape), rtol=1e-6)
    with pytest.raises(ValueError, match="global norm init 'x' must be one of"):
        jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, global_norm_init="x", **kw)


def test_jt5_load_converts_every_format(tmp_path):
    """jt5.load: a transformers directory and a jt5 checkpoint of the same T5 give the model
    from_pretrained gives."""
    from jt5 import weights
    hf_models.build("t5-v1_1", tmp_path / "t5")
    kw = dict(attention="xla", encoder_attention_type="transient-global", local_radius=5,
              global_block_size=4)
    ref = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5", **kw)
    weights.save_native(jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5"),
                        tmp_path / "native")
    want = dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
    for src in ("t5", "native"):
        got = jt5.load(tmp_path / src, **kw)
        assert got.config == ref.config, src
        flat = dict(nnx.to_flat_state(nnx.state(got, nnx.Param)))
        assert flat.keys() == want.keys()
        for p, v in want.items():
            np.testing.assert_array_equal(np.asarray(flat[p].get_value()),
                                          np.asarray(v.get_value()), err_msg=f"{src} {p}")


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
    with pytest.raises(ValueError, match="transient-global' is LongT5's: use model_type"):
        jt5.preset("tiny", encoder_attention_type="transient-global")


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


# -- transient-global in linear memory ---------------------------------------------------------
def _global_inputs(B=2, S=45, N=3, H=8, K=8, g=4, seed=0):
    r = np.random.default_rng(seed)
    G = S // g
    q, k, v = (jnp.asarray(r.normal(size=(B, S, N, H)), jnp.float32) for _ in range(3))
    sk, sv = (jnp.asarray(r.normal(size=(B, G, N, H)), jnp.float32) for _ in range(2))
    tables = [jnp.asarray(r.normal(size=(K, N)), jnp.float32) for _ in range(2)]
    seg = np.ones((B, S), np.int32)
    seg[1, S - 13:] = 0  # padding (and an orphan tail in row 0: 45 = 11 * 4 + 1)
    seg[1, 5:7] = 0      # a hole
    return q, k, v, sk, sv, tables, jnp.asarray(seg)


def _plans(monkeypatch, cfg, seg, S, tables):
    from jt5 import attention_ops as ops
    rel = [ops.RelativeBias(t, bidirectional=True, max_distance=cfg.relative_attention_max_distance)
           for t in tables]
    mask = ops.Mask(kv_segment_ids=seg)
    dense = longt5.make_global_plan(cfg, mask, S, *rel)
    with monkeypatch.context() as m:
        m.setattr(ops, "CHUNKED_MIN_ELEMENTS", 1)
        linear = longt5.make_global_plan(cfg, mask, S, *rel)
    assert dense.impl == "dense" and linear.impl == "chunked"
    assert linear.bias is None and linear.mask is None and linear.block_onehot is None
    return dense, linear


@pytest.mark.parametrize("radius,g,block_q,side_q", [(6, 4, 8, 4), (2, 3, 16, 5), (50, 4, 7, 64),
                                                    (0, 1, 45, 45)])
def test_linear_transient_global_equals_dense(monkeypatch, radius, g, block_q, side_q):
    """Local window and side keys apart, merged through their log-sum-exps, in chunks that do
    not divide the length: the dense plan's one softmax, forward and every gradient."""
    import jax
    from jt5 import attention_ops as ops
    from jt5.pallas_kernels import chunked, reference

    cfg = jt5.preset("tiny", model_type="longt5", encoder_attention_type="transient-global",
                     local_radius=radius, global_block_size=g, num_heads=3, d_kv=8,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20)
    q, k, v, sk, sv, tables, seg = _global_inputs(g=g)
    B, S = q.shape[:2]
    sk, sv = sk[:, :S // g], sv[:, :S // g]
    if sk.shape[1] < S // g:
        r = np.random.default_rng(1)
        sk, sv = (jnp.asarray(r.normal(size=(2, S // g, 3, 8)), jnp.float32) for _ in range(2))
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def dense_loss(q, k, v, sk, sv, t0, t1):
        plan, _ = _plans(monkeypatch, cfg, seg, S, (t0, t1))
        y = reference.attend_dense(q, jnp.concatenate([k, sk], 1), jnp.concatenate([v, sv], 1),
                                   plan.bias, plan.mask)
        return jnp.sum(y * w), y

    def linear_loss(q, k, v, sk, sv, t0, t1):
        _, plan = _plans(monkeypatch, cfg, seg, S, (t0, t1))
        local = ops.Mask(kv_segment_ids=jnp.broadcast_to(plan.is_token, (B, S)).astype(
            jnp.int32), local_window=plan.local_radius)
        loc, lse_l = chunked.window_attention(q, k, v, local, plan.local_bias, block_q=block_q)
        side, lse_s = longt5.side_attention(q, sk, sv, plan, block_q=side_q)
        y = chunked.merge_lse(loc, lse_l, side, lse_s)
        return jnp.sum(y * w), y

    args = (q, k, v, sk, sv, *tables)
    grad = functools.partial(jax.value_and_grad, argnums=tuple(range(7)), has_aux=True)
    with jax.default_matmul_precision("highest"):
        (_, ref), g_ref = jax.jit(grad(dense_loss))(*args)
        (_, out), g_out = jax.jit(grad(linear_loss))(*args)
    assert_close(out, ref, dtype="float32", check="hidden", what="linear tglobal forward")
    for name, a, b in zip(("q", "k", "v", "side_k", "side_v", "local table", "global table"),
                          g_out, g_ref):
        assert float(jnp.max(jnp.abs(b))) > 0, name
        assert_close(a, b, dtype="float32", check="grad", what=f"d{name}")


def test_model_switches_to_linear_transient_global(monkeypatch):
    """The whole encoder above the switch-over: same output, same gradients of every parameter
    (global norms and both tables included) as the dense plan."""
    import jax
    from jt5 import attention_ops as ops

    cfg = jt5.preset("tiny", model_type="longt5", encoder_attention_type="transient-global",
                     local_radius=6, global_block_size=4, attention="xla")
    model = jt5.init_model(cfg, jt5.T5EncoderModel, seed=1)
    ids, _, mask = _batch()

    def run():
        def loss(m):
            return jnp.mean(jnp.sin(m(ids, mask)))
        with jax.default_matmul_precision("highest"):
            value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return float(value), {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}

    dense_loss, dense_grads = run()
    monkeypatch.setattr(ops, "CHUNKED_MIN_ELEMENTS", 1)
    assert longt5.global_impl(cfg, 45) == "chunked"
    linear_loss, linear_grads = run()
    np.testing.assert_allclose(linear_loss, dense_loss, rtol=1e-5)
    assert any("global_norm" in str(p) for p in dense_grads)
    for p, g in dense_grads.items():
        assert_close(linear_grads[p], g, dtype="float32", check="grad", what=str(p))


def _global_temp_bytes(monkeypatch, S: int, linear: bool) -> int:
    import jax
    from jt5 import attention_ops as ops

    B, N, H, g, K = 1, 4, 32, 16, 32
    cfg = jt5.preset("tiny", model_type="longt5", encoder_attention_type="transient-global",
                     local_radius=127, global_block_size=g)
    spec = jax.ShapeDtypeStruct((B, S, N, H), jnp.float32)
    side = jax.ShapeDtypeStruct((B, S // g, N, H), jnp.float32)
    table = jax.ShapeDtypeStruct((K, N), jnp.float32)

    def loss(q, k, v, sk, sv, t0, t1):
        from jt5.pallas_kernels import reference
        rel = [ops.RelativeBias(t, max_distance=128) for t in (t0, t1)]
        plan = longt5.make_global_plan(cfg, ops.Mask(), S, *rel)
        assert plan.impl == ("chunked" if linear else "dense")
        if linear:
            y = longt5.global_attention(q, k, v, sk, sv, plan)
        else:
            y = reference.attend_dense(q, jnp.concatenate([k, sk], 1),
                                       jnp.concatenate([v, sv], 1), plan.bias, plan.mask)
        return jnp.sum(y)

    with monkeypatch.context() as m:
        m.setattr(ops, "CHUNKED_MIN_ELEMENTS", 1 if linear else 1 << 62)
        compiled = jax.jit(jax.grad(loss, range(7))).lower(
            spec, spec, spec, side, side, table, table).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_linear_transient_global_memory_is_linear_in_length(monkeypatch):
    """XLA's own buffer assignment, forward + backward: 4x the length at most ~4x the
    temporaries on the linear path; the dense plan's grow ~16x."""
    small, large = (_global_temp_bytes(monkeypatch, S, True) for S in (2048, 8192))
    assert large < 5.0 * small, (small, large)
    d_small, d_large = (_global_temp_bytes(monkeypatch, S, False) for S in (1024, 2048))
    assert d_large > 3.5 * d_small and d_large > 2 * small, (d_small, d_large, small)
