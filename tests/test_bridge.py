"""The HF <-> jt5 bridge: exact round trips, v4/v5 config semantics, and every bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import jt5  # noqa: E402
from jt5.bridge import CheckpointError, hf_to_jt5, jt5_to_hf, read_config  # noqa: E402
from jt5.bridge.keymap import config_from_hf  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", list(hf_models.VARIANTS))
def test_hf_to_jt5_to_hf_is_bit_exact(name, tmp_path):
    hf_models.build(name, tmp_path, style="v4")
    sd = load_file(str(tmp_path / "model.safetensors"))
    raw = read_config(tmp_path)
    config, params = hf_to_jt5(sd, raw)
    back, back_cfg = jt5_to_hf(config, params)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        assert back[k].tobytes() == sd[k].tobytes(), f"{k} differs after the round trip"
    for key in ("model_type", "d_model", "num_layers", "num_decoder_layers", "num_heads",
                "d_kv", "d_ff", "feed_forward_proj", "relative_attention_num_buckets",
                "relative_attention_max_distance", "vocab_size"):
        assert back_cfg[key] == {**hf_models.SMALL, **raw}[key], key


def test_bfloat16_checkpoint_round_trip(tmp_path):
    import ml_dtypes
    hf_models.build("t5-v1_1", tmp_path)
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    config, params = hf_to_jt5(sd, read_config(tmp_path))
    back, _ = jt5_to_hf(config, params)
    assert all(back[k].tobytes() == sd[k].tobytes() for k in sd)


# An untied UMT5 written by transformers 5.0-5.23 itself means "scaled" (that is what those
# versions compute from it), unlike the original model: it is exported from a v4-style file only.
EXPORT_CASES = [(n, s) for n in ("t5-v1_0", "t5-v1_1", "mt5", "umt5-tied", "odd-shapes")
                for s in ("hf", "v4")] + [("umt5", "v4")]


@pytest.mark.parametrize("name,style", EXPORT_CASES, ids=[f"{n}-{s}" for n, s in EXPORT_CASES])
def test_save_pretrained_loads_in_transformers_with_same_logits(name, style, tmp_path):
    """jt5 -> HF directory -> transformers' from_pretrained gives jt5's logits."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    hf_models.build(name, src, style=style)
    model = jt5.T5ForConditionalGeneration.from_pretrained(src, attention="xla")
    model.save_pretrained(dst)
    _, Model, _ = hf_models.hf_classes(hf_models.VARIANTS[name][0])
    reloaded = Model.from_pretrained(dst).eval()
    assert type(reloaded).__name__ == json.loads((dst / "config.json").read_text())["architectures"][0]
    ids, mask, dec = hf_models.inputs(model.config.vocab_size)
    ref = hf_models.hf_reference_logits(reloaded, name, ids, mask, dec)
    ours = model(jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask))
    assert_close(ours, ref, dtype="float32", check="logits", what=f"{name}/{style} export")


def test_encoder_model_export_loads_as_encoder(tmp_path):
    hf_models.build("mt5", tmp_path / "src")
    enc = jt5.T5EncoderModel.from_pretrained(tmp_path / "src", attention="xla")
    enc.save_pretrained(tmp_path / "dst")
    import torch
    from transformers import MT5EncoderModel
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["architectures"] == [
        "MT5EncoderModel"]
    hf = MT5EncoderModel.from_pretrained(tmp_path / "dst").eval()
    ids, mask, _ = hf_models.inputs(enc.config.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).last_hidden_state
    assert_close(enc(jnp.asarray(ids), jnp.asarray(mask)), ref.numpy(), dtype="float32",
                 check="hidden", what="encoder export")


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    import torch
    hf = hf_models.build("t5-v1_1", tmp_path / "single")
    model = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "single", attention="xla")
    bridge_hf = sys.modules["jt5.bridge.hf"]
    sd, cfg = jt5_to_hf(model.config, jt5.weights.model_params(model))
    bridge_hf.write_hf_dir(tmp_path / "sharded", sd, cfg, max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    torch.save({k: v for k, v in hf.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    ids, mask, dec = hf_models.inputs(model.config.vocab_size)
    ref = model(jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask))
    for d in ("sharded", "bin"):
        m = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / d, attention="xla")
        np.testing.assert_array_equal(m(jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask)), ref)


# What each transformers version writes into config.json for each family (read off its
# configuration/modeling sources and its save_pretrained), and the decoder-output scaling that
# version computes from that file. jt5 must read every such file as its writer meant it.
_BASE = dict(d_model=8, num_heads=2, d_kv=4)
WRITERS = [
    # (writer, model_type, keys the writer puts in config.json, the writer's scaling)
    ("4.46 T5 v1.0", "t5", {}, True),                                   # tie key left at default
    ("4.46 T5 v1.0", "t5", {"tie_word_embeddings": True}, True),
    ("4.46 T5 v1.1/Flan", "t5", {"tie_word_embeddings": False}, False),
    ("4.46 mT5", "mt5", {"tie_word_embeddings": False}, False),
    ("4.46 mT5", "mt5", {}, False),                                     # v4 default: untied
    ("4.46 mT5 tied", "mt5", {"tie_word_embeddings": True}, True),
    ("4.46 UMT5", "umt5", {"tie_word_embeddings": False}, False),
    ("4.46 UMT5 tied", "umt5", {}, True),
    ("5.0 T5 v1.0", "t5", {"tie_word_embeddings": True, "scale_decoder_outputs": True}, True),
    ("5.0 T5 v1.1", "t5", {"tie_word_embeddings": True, "scale_decoder_outputs": False}, False),
    ("5.23 T5 v1.1", "t5", {"tie_word_embeddings": True, "scale_decoder_outputs": False}, False),
    ("5.0 mT5", "mt5", {"tie_word_embeddings": True}, False),           # v5 never scales mT5
    ("5.23 mT5", "mt5", {"tie_word_embeddings": True}, False),
    ("5.24 mT5", "mt5", {"tie_word_embeddings": True}, False),
    ("5.0 UMT5", "umt5", {"tie_word_embeddings": True}, True),          # 5.0-5.23 always scale
    ("5.23 UMT5", "umt5", {"tie_word_embeddings": True}, True),
    ("5.24 UMT5", "umt5", {"tie_word_embeddings": True, "scale_decoder_outputs": False}, False),
    ("5.24 UMT5 tied", "umt5", {"tie_word_embeddings": True, "scale_decoder_outputs": True}, True),
    ("5.24 T5 v1.1", "t5", {"tie_word_embeddings": True, "scale_decoder_outputs": False}, False),
    ("jt5 export", "mt5", {"tie_word_embeddings": False, "scale_decoder_outputs": False}, False),
]


@pytest.mark.parametrize("writer,model_type,keys,scaled", WRITERS,
                         ids=[f"{w}-{sorted(k.items())}" for w, _, k, _ in WRITERS])
def test_config_scaling_per_writer_version(writer, model_type, keys, scaled):
    version = writer.split()[0]
    raw = {**_BASE, "model_type": model_type, **keys}
    if version != "jt5":
        raw["transformers_version"] = version + ".0"
    c = config_from_hf(raw, has_lm_head=True)
    assert c.scale_decoder_outputs is scaled, (writer, raw)


def test_config_scaling_of_installed_transformers_own_files(tmp_path):
    """Whatever transformers is installed: a file it writes reads back with the scaling it
    computes itself (detected from its logits, not from its version)."""
    for name in ("t5-v1_0", "t5-v1_1", "mt5", "umt5", "umt5-tied"):
        hf = hf_models.build(name, tmp_path / name, style="hf")
        ids, mask, dec = hf_models.inputs(hf.config.vocab_size, batch=2)
        import torch
        with torch.no_grad():
            out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     decoder_input_ids=torch.as_tensor(dec), output_hidden_states=True)
        applied = hf_models.applied_scaling(hf, out.logits.numpy(), out.decoder_hidden_states[-1])
        c = config_from_hf(read_config(tmp_path / name), has_lm_head=True)
        assert c.scale_decoder_outputs is applied, name


def test_config_other_fields():
    base = {**_BASE, "model_type": "t5"}
    assert config_from_hf(dict(base, model_type="umt5"), has_lm_head=True).relative_bias_per_layer
    assert config_from_hf({**base, "eos_token_id": [1, 5]}, has_lm_head=True).eos_token_id == 1
    assert config_from_hf(base, has_lm_head=False).tie_word_embeddings
    assert not config_from_hf(base, has_lm_head=True).tie_word_embeddings


# -- bad inputs -------------------------------------------------------------------------------
@pytest.fixture
def good_dir(tmp_path):
    hf_models.build("t5-v1_1", tmp_path / "m")
    return tmp_path / "m"


def _load(path):
    return jt5.T5ForConditionalGeneration.from_pretrained(path, attention="xla")


def _edit_weights(path, fn):
    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_missing_key_is_named(good_dir):
    _edit_weights(good_dir, lambda sd: sd.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*decoder\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight"):
        _load(good_dir)


def test_unexpected_key_is_named(good_dir):
    _edit_weights(good_dir, lambda sd: sd.__setitem__("encoder.block.7.layer.0.layer_norm.weight",
                                                      np.ones(32, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected.*encoder\.block\.7"):
        _load(good_dir)


def test_shape_mismatch_is_named(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["d_ff"] = 64
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"wi_0\.weight has shape \(48, 32\) but config\.json implies \(64, 32\)"):
        _load(good_dir)


def test_unsupported_model_type(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    cfg["model_type"] = "bart"
    (good_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'bart'"):
        _load(good_dir)


def test_truncated_and_corrupt_files(good_dir):
    f = good_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        _load(good_dir)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        _load(good_dir)
    f.unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        _load(good_dir)
    (good_dir / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        _load(good_dir)


def test_corrupt_pytorch_bin_and_missing_shard(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read"):
        _load(tmp_path / "bin")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp_path / "idx" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard model-00001-of-00002.safetensors is missing"):
        _load(tmp_path / "idx")


def test_pickle_with_code_is_refused(tmp_path):
    """pytorch_model.bin is read weights-only: a pickle that would run code is rejected."""
    import pickle
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    torch.save({"shared.weight": Evil()}, tmp_path / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights-only"):
        _load(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_untied_tied_copy_mismatch(good_dir):
    _edit_weights(good_dir, lambda sd: sd.__setitem__("encoder.embed_tokens.weight",
                                                      sd["shared.weight"] + 1))
    with pytest.raises(CheckpointError, match="encoder.embed_tokens.weight differs from shared.weight"):
        _load(good_dir)


def test_core_import_without_torch():
    """``import jt5`` (model, config, bridge conversion) works where torch cannot be imported."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import jt5, jt5.bridge, jt5.weights, jax.numpy as jnp\n"
            "m = jt5.init_model(jt5.preset('tiny', attention='xla'))\n"
            "print(m(jnp.ones((1, 4), 'int32'), jnp.ones((1, 3), 'int32')).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": ""}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 3, 384)" in out.stdout


def test_nnx_state_paths_match_keymap():
    """Every jt5 parameter has exactly one transformers key, for each architecture variant."""
    from jt5.bridge.keymap import rules
    for name, (mt, over, untied) in hf_models.VARIANTS.items():
        raw = {**hf_models.SMALL, **over, "model_type": mt,
               "tie_word_embeddings": not untied}
        cfg = config_from_hf(raw, has_lm_head=untied)
        model = jt5.abstract_model(cfg)
        paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        mapped = [r.jt5 for r in rules(cfg)]
        assert len(mapped) == len(set(mapped)) and set(mapped) == paths, name


def _load_warnings(Model, path) -> set:
    """The warnings transformers logs while loading ``path`` (message prefixes, paths removed)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage().replace(str(path), "<dir>")[:80])
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        Model.from_pretrained(path)
    finally:
        logger.removeHandler(handler)
    return set(records)


@pytest.mark.parametrize("name", ["t5-v1_0", "t5-v1_1", "umt5"])
def test_export_loads_as_quietly_as_transformers_own_save(name, tmp_path):
    """A jt5 export warns in transformers no more than transformers' own save of the same model.

    (transformers 5.x forces ``tie_word_embeddings`` to true for the T5 family and warns that
    ``lm_head.weight`` and ``shared.weight`` differ for every untied checkpoint, its own saves
    included; no config.json can silence that, so the bar is transformers' own file.)"""
    hf = hf_models.build(name, tmp_path / "v4", style="v4")
    hf.save_pretrained(tmp_path / "theirs")
    jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "v4", attention="xla").save_pretrained(
        tmp_path / "ours")
    _, Model, _ = hf_models.hf_classes(hf_models.VARIANTS[name][0])
    ours, theirs = _load_warnings(Model, tmp_path / "ours"), _load_warnings(Model, tmp_path / "theirs")
    assert ours <= theirs, f"warnings only jt5's export causes: {ours - theirs}"
