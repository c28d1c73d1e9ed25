"""Weight-only int8 / fp8: a model quantised at load equals transformers running the weights the
quantisation leaves (per output channel, rounded by numpy / torch's own float8 cast, not by jt5);
quantised checkpoints save (int8 / F8_E4M3 tensors + ``weight_scale``) and reload; the decoder
and ``generate`` take the same option; bad requests fail with one clear message."""
from __future__ import annotations

import json

import numpy as np
import pytest

import jt5
from jt5 import quant
from tests import hf_models
from tests.conftest import assert_close

# transformers module names of each layer kind (nn.Linear weights are [out, in])
KIND_NAMES = {"mlp_in": ("wi", "wi_0", "wi_1"), "mlp_out": ("wo",), "attn_qkv": ("q", "k", "v"),
              "attn_out": ("o",), "embedding": ("shared",)}


def _fake_quant(w, fmt, group=None):
    """What quantising ``w`` [out, in] per output row leaves, in torch (the oracle's rounding);
    ``group``: per run of ``group`` consecutive inputs of each row instead."""
    import torch
    qmax = 127.0 if fmt == "int8" else 448.0
    shape = w.shape
    if group is not None:
        w = w.reshape(shape[0], shape[1] // group, group)
    scale = w.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = (w / scale).clamp(-qmax, qmax)
    x = x.round() if fmt == "int8" else x.to(torch.float8_e4m3fn).float()
    return (x * scale).reshape(shape)


def _reference(model, fmt, kinds, group=None):
    """``model`` (transformers) with the weights of ``kinds`` replaced by their quantised values
    (``group``: group-wise along each Linear's inputs; the embedding keeps per-row scales)."""
    import torch
    names = {n for k in kinds for n in KIND_NAMES[k]}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in names:
                if name.startswith("lm_head"):
                    continue
                mod.weight.copy_(_fake_quant(mod.weight.float(), fmt, group))
        if "shared" in names:  # [V, D]: one scale per row; a tied head shares the table
            model.shared.weight.copy_(_fake_quant(model.shared.weight.float(), fmt))
    return model


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5q")
    hf_models.build("t5-v1_1", d)
    return d


@pytest.mark.parametrize("variant,fmt,kinds", [
    ("t5-v1_1", "int8", ()), ("t5-v1_1", "fp8", ()), ("t5-v1_1", "int8", ("mlp_in",)),
    ("t5-v1_0", "int8", ("embedding", "mlp_in"))])  # tied head: the quantised table's rows
def test_quantised_at_load_equals_transformers_on_the_quantised_weights(tmp_path, variant, fmt,
                                                                          kinds):
    hf_models.build(variant, tmp_path / "m")
    model = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "m", weights=fmt,
                                                           quantized=kinds)
    want = kinds or jt5.config.QUANT_DEFAULT[fmt]
    assert model.config.quantized_kinds == tuple(want)
    ref = _reference(hf_models.build(variant, tmp_path / "ref"), fmt, want)
    ids, mask, dec = hf_models.inputs(99)
    expected = hf_models.hf_reference_logits(ref, variant, ids, mask, dec)
    assert_close(model(ids, dec, mask), expected, dtype="float32", check="logits",
                 what=f"{fmt} {want} vs transformers on the quantised weights")
    float_model = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert np.abs(np.asarray(float_model(ids, dec, mask)) - expected).max() > 1e-4  # not a no-op


def test_saved_checkpoint_reloads_and_generates(t5_dir, tmp_path):
    from safetensors import safe_open

    from jt5.weights import load_native, save_native
    ids, mask, dec = hf_models.inputs(99)
    for fmt, dtype in (("int8", "I8"), ("fp8", "F8_E4M3")):
        model = jt5.T5ForConditionalGeneration.from_pretrained(t5_dir, weights=fmt)
        if fmt == "int8":  # the embedding's row scales save and reload too
            emb = jt5.T5ForConditionalGeneration.from_pretrained(
                t5_dir, weights=fmt, quantized=("embedding", "attn_qkv"))
            emb.save_pretrained(tmp_path / "emb")
            np.testing.assert_array_equal(
                np.asarray(jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "emb")(
                    ids, dec, mask)), np.asarray(emb(ids, dec, mask)))
        out = np.asarray(model(ids, dec, mask))
        model.save_pretrained(tmp_path / fmt)
        cfg = json.loads((tmp_path / fmt / "config.json").read_text())
        assert cfg["quantization_config"] == {"quant_method": "jt5", "weights": fmt,
                                              "layers": list(jt5.config.QUANT_DEFAULT[fmt])}
        key = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
        with open(tmp_path / fmt / "model.safetensors", "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        assert header[key]["dtype"] == dtype and header[key + "_scale"]["shape"] == [48]
        assert header["shared.weight"]["dtype"] == "F32"  # embeddings stay high precision
        with safe_open(str(tmp_path / fmt / "model.safetensors"), "numpy") as h:
            assert "encoder.block.0.layer.0.layer_norm.weight" in h.keys()
        again = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / fmt)
        assert again.config.weights == fmt
        np.testing.assert_array_equal(np.asarray(again(ids, dec, mask)), out)
        # read back as float: the dequantised weights, the same function
        wide = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / fmt, weights="float")
        assert wide.config.weights == "float"
        assert_close(wide(ids, dec, mask), out, dtype="float32", check="logits",
                     what=f"{fmt} file read as float")
        # jt5's own checkpoint keeps the quantised tensors too
        save_native(model, tmp_path / f"{fmt}-native")
        native = load_native(tmp_path / f"{fmt}-native", jt5.T5ForConditionalGeneration)
        np.testing.assert_array_equal(np.asarray(native(ids, dec, mask)), out)
        np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=6),
                                      again.generate(ids, mask, max_new_tokens=6))
    with pytest.raises(ValueError, match="stored as int8"):
        jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "int8", weights="fp8")


def test_generate_with_int8_weights_equals_transformers(t5_dir):
    import torch
    ref = _reference(hf_models.build("t5-v1_1", t5_dir.parent / "gen-ref"), "int8",
                     jt5.config.QUANT_DEFAULT["int8"])
    model = jt5.T5ForConditionalGeneration.from_pretrained(t5_dir, weights="int8")
    ids, mask, _ = hf_models.inputs(99)
    got = model.generate(ids, mask, max_new_tokens=8, min_new_tokens=8)
    with torch.no_grad():
        want = ref.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                            max_new_tokens=8, min_new_tokens=8, do_sample=False).numpy()
    np.testing.assert_array_equal(np.asarray(got)[:, :want.shape[1]], want)


def test_memory_and_what_is_never_quantised(t5_dir):
    f32 = jt5.T5EncoderModel.from_pretrained(t5_dir)
    q = jt5.T5EncoderModel.from_pretrained(t5_dir, weights="int8")
    cfg = f32.config
    D, F, NH, L = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv, cfg.num_layers
    matmul = L * (3 * D * NH + NH * D + 2 * D * F + F * D)
    scales = L * (3 * NH + D + 2 * F + D) * 4
    assert quant.weight_bytes(f32) - quant.weight_bytes(q) == matmul * 4 - matmul - scales
    from jt5.weights import model_params
    for path, a in model_params(q).items():
        if quant.layer_kind(path[:-1]) is None:  # norms, embeddings, bias tables
            assert a.dtype == np.float32, path


def test_bad_requests_are_one_clear_error(t5_dir, tmp_path):
    with pytest.raises(ValueError, match="weights='int4' must be one of"):
        jt5.T5EncoderModel.from_pretrained(t5_dir, weights="int4")
    with pytest.raises(ValueError, match="unknown layer kinds"):
        jt5.T5EncoderModel.from_pretrained(t5_dir, weights="int8", quantized=("embeddings",))
    import shutil
    shutil.copytree(t5_dir, tmp_path / "bnb")
    cfg = json.loads((tmp_path / "bnb" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "bnb" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bitsandbytes.*not jt5's"):
        jt5.T5EncoderModel.from_pretrained(tmp_path / "bnb")


@pytest.mark.parametrize("eq,x_shape,w_shape,axes,kind", [
    ("BTD,DF->BTF", (2, 5, 16), (16, 12), ("embed", "mlp"), "mlp_in"),
    ("BSD,DNH->BSNH", (2, 5, 16), (16, 3, 4), ("embed", "heads", "kv"), "attn_qkv"),
    ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 10), ("heads", "kv", "embed"), "attn_out"),
    ("BTD,VD->BTV", (2, 5, 16), (12, 16), ("vocab", "embed"), "embedding")])  # a tied head
def test_int8_compute_is_the_integer_product_of_quantised_rows_and_channels(
        eq, x_shape, w_shape, axes, kind):
    """int8_compute: each row of x (all but its batch and length axes) by its absmax / 127,
    int8 x int8 summed exactly, both scales after: a float64 numpy reference of that scheme."""
    from jt5.layers import QuantizedWeight, matmul
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    x[0, 1] *= 40.0  # rows of very different ranges: the scale is per row
    w = QuantizedWeight(rng.normal(size=w_shape).astype(np.float32), axes, kind, "int8",
                        int8_compute=True)
    n_out = 2 if kind == "attn_qkv" else 1
    got = np.asarray(matmul(eq, x, w, dtype=np.float32))
    sx = np.abs(x).max(axis=tuple(range(2, x.ndim)), keepdims=True) / 127.0
    xq = np.round(x / sx)
    want = (np.einsum(eq, xq, np.asarray(w.qweight[...], np.float64))
            * sx.reshape(sx.shape[:2] + (1,) * n_out) * np.asarray(w.scale[...], np.float64))
    assert_close(got, want, dtype="float32", check="hidden", what=f"int8 compute {eq}")


def test_int8_compute_model_stays_near_transformers(t5_dir):
    from tests.conftest import assert_kl
    model = jt5.T5ForConditionalGeneration.from_pretrained(t5_dir, weights="int8",
                                                           int8_compute=True)
    ids, mask, dec = hf_models.inputs(99)
    ref = hf_models.build("t5-v1_1", t5_dir.parent / "act-ref")
    expected = hf_models.hf_reference_logits(ref, "t5-v1_1", ids, mask, dec)
    assert_kl(expected, model(ids, dec, mask), dtype="int8_compute",
              what="int8 weights x int8 activations")
    with pytest.raises(ValueError, match="int8_compute=True runs int8 weights"):
        jt5.T5EncoderModel.from_pretrained(t5_dir, weights="fp8", int8_compute=True)


# -- group-wise scales (T5Config.quant_group_size) --------------------------------------------
# tests/hf_models' widths: d_model 32, d_ff 48, heads x d_kv 32; groups of 8 inputs.
GROUP = 8


@pytest.mark.parametrize("variant,fmt,kinds", [
    ("t5-v1_1", "int8", ()), ("t5-v1_1", "fp8", ()),
    ("t5-v1_0", "int8", ("embedding", "mlp_in"))])  # the embedding keeps its per-row scales
def test_group_quantised_at_load_equals_transformers_on_the_quantised_weights(
        tmp_path, variant, fmt, kinds):
    """transformers on each Linear's weight rounded per ``GROUP`` inputs of each output row (the
    ``o`` projection's inputs are heads x d_kv in transformers' order) vs jt5 with the scales."""
    hf_models.build(variant, tmp_path / "m")
    model = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "m", weights=fmt,
                                                           quantized=kinds,
                                                           quant_group_size=GROUP)
    want = kinds or jt5.config.QUANT_DEFAULT[fmt]
    assert model.config.quant_group_size == GROUP
    if "attn_out" in want:
        o = model.encoder.layers[0].self_attn.o  # [N, H, D]: scales over heads x d_kv / GROUP
        assert o.scale.shape == (4 * 8 // GROUP, 32) and o.group_size == GROUP
    if "embedding" in want:  # per row, whatever the group size
        assert model.shared.embedding.scale.shape == (99,)
    ref = _reference(hf_models.build(variant, tmp_path / "ref"), fmt, want, GROUP)
    ids, mask, dec = hf_models.inputs(99)
    expected = hf_models.hf_reference_logits(ref, variant, ids, mask, dec)
    got = model(ids, dec, mask)
    assert_close(got, expected, dtype="float32", check="logits",
                 what=f"{fmt} {want} groups of {GROUP} vs transformers on the quantised weights")
    per_channel = _reference(hf_models.build(variant, tmp_path / "pc"), fmt, want)
    other = hf_models.hf_reference_logits(per_channel, variant, ids, mask, dec)
    assert np.abs(np.asarray(got) - other).max() > 1e-4  # not the per-channel rounding


def test_group_scales_save_and_reload(t5_dir, tmp_path):
    from jt5.weights import load_native, save_native
    ids, mask, dec = hf_models.inputs(99)
    model = jt5.T5ForConditionalGeneration.from_pretrained(t5_dir, weights="int8",
                                                           quant_group_size=GROUP)
    out = np.asarray(model(ids, dec, mask))
    model.save_pretrained(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["quantization_config"]["group_size"] == GROUP
    with open(tmp_path / "g" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    mlp, attn = "encoder.block.0.layer.1.DenseReluDense.", "encoder.block.0.layer.0.SelfAttention."
    # transformers' [out, in / G]: weight[o, i] * weight_scale[o, i // G]
    assert header[mlp + "wi_0.weight_scale"]["shape"] == [48, 32 // GROUP]
    assert header[mlp + "wo.weight_scale"]["shape"] == [32, 48 // GROUP]
    assert header[attn + "o.weight_scale"]["shape"] == [32, 32 // GROUP]
    again = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "g")
    assert again.config.quant_group_size == GROUP and again.config.weights == "int8"
    np.testing.assert_array_equal(np.asarray(again(ids, dec, mask)), out)
    wide = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "g", weights="float")
    assert wide.config.quant_group_size is None
    assert_close(wide(ids, dec, mask), out, dtype="float32", check="logits",
                 what="group-quantised file read as float")
    save_native(model, tmp_path / "native")
    native = load_native(tmp_path / "native", jt5.T5ForConditionalGeneration)
    assert native.config.quant_group_size == GROUP
    np.testing.assert_array_equal(np.asarray(native(ids, dec, mask)), out)
    with pytest.raises(ValueError, match="stored with quant_group_size=8 scales; loading it "
                                         "with quant_group_size=16 scales would round it twice"):
        jt5.T5ForConditionalGeneration.from_pretrained(tmp_path / "g", quant_group_size=16)
    jt5.T5EncoderModel.from_pretrained(t5_dir, weights="int8").save_pretrained(tmp_path / "pc")
    with pytest.raises(ValueError, match="stored with per-channel scales"):
        jt5.T5EncoderModel.from_pretrained(tmp_path / "pc", quant_group_size=GROUP)


@pytest.mark.parametrize("kw,message", [
    (dict(weights="int8", quant_group_size=0), "quant_group_size=0 must be a positive integer"),
    (dict(weights="int8", quant_group_size=8.0), "must be a positive integer"),
    (dict(quant_group_size=8), "quant_group_size=8 applies to quantised weights only"),
    (dict(weights="int8", quant_group_size=8, int8_compute=True),
     "int8_compute=True needs one scale per output channel"),
    (dict(weights="int8", quant_group_size=32),  # d_model 32, d_ff 48
     r"quant_group_size=32 does not divide encoder/layers/0/mlp/wo \[48, 32\] \(and every "
     r"mlp_out weight\): its contraction size 48"),
    (dict(weights="fp8", quantized=("attn_qkv",), quant_group_size=64),
     r"does not divide encoder/layers/0/self_attn/q \[32, 4, 8\]")])
def test_bad_group_sizes_are_one_clear_error(t5_dir, kw, message):
    with pytest.raises(ValueError, match=message) as e:
        jt5.T5EncoderModel.from_pretrained(t5_dir, **kw)
    assert "\n" not in str(e.value)


def test_group_rounding_error_is_smaller_than_per_channel():
    """Gaussian weights at T5-XXL's d_model: groups of 128 inputs cut int8's rounding error by
    ~26% (max over 128 ~ 2.6 sigma against ~3.5 sigma over 4096); fp8 rounds relative to each
    value, so groups help it little, but never hurt."""
    w = np.random.default_rng(0).normal(size=(4096, 256)).astype(np.float32)
    for fmt, most in (("int8", 0.8), ("fp8", 1.0)):
        q, s = quant.quantize_as("mlp_in", w, fmt)
        per_channel = np.sqrt(np.mean((quant.dequantize(q, s, "mlp_in") - w) ** 2))
        q, s = quant.quantize_as("mlp_in", w, fmt, group=128)
        assert s.shape == (32, 256)
        grouped = np.sqrt(np.mean((quant.dequantize(q, s, "mlp_in") - w) ** 2))
        assert grouped < most * per_channel, (fmt, grouped, per_channel)


def test_cli_quant_group_size(byt5_dir, tmp_path, capsys):
    """``jt5 embed --weights int8 --quant-group-size G`` is ``jt5.embed(..., quant_group_size=G)``;
    a group size the widths or ``--int8-compute`` rule out is one error line."""
    from jt5 import cli
    from tests.test_cli import assert_one_error_line, run
    txt = tmp_path / "t.txt"
    txt.write_text("hello there\nshort\n")
    base = ["embed", "--model", str(byt5_dir), "--no-progress", str(txt), "--weights", "int8"]
    assert cli.main(base + ["--quant-group-size", str(GROUP), "--output",
                            str(tmp_path / "g.npy")]) == 0
    want = jt5.embed(byt5_dir, ["hello there", "short"], weights="int8", quant_group_size=GROUP)
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), want.embeddings)
    capsys.readouterr()
    code, _, err = run(base + ["--quant-group-size", "8", "--int8-compute", "--output",
                               str(tmp_path / "x.npy")], capsys)
    assert_one_error_line(code, err, "int8_compute=True needs one scale per output channel")
    code, _, err = run(base + ["--quant-group-size", "0", "--output", "x.npy"], capsys)
    assert_one_error_line(code, err, "--quant-group-size", "must be >= 1")
