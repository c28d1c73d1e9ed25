"""jt5 vs transformers' PyTorch T5 on tiny random models of every supported variant."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jt5  # noqa: E402
from tests import hf_models  # noqa: E402
from tests.conftest import assert_close, assert_kl, kl_next_token  # noqa: E402


@nnx.jit
def _forward(model, ids, dec, mask):
    return model(ids, dec, mask)


@nnx.jit
def _encode(model, ids, mask):
    return model(ids, mask)


@pytest.fixture(scope="module", params=list(hf_models.VARIANTS))
def variant(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name)
    hf = hf_models.build(name, path, style="v4")
    return name, path, hf


def test_float32_logits_and_encoder_states(variant):
    name, path, hf = variant
    vocab = hf.config.vocab_size
    ids, mask, dec = hf_models.inputs(vocab)
    ref = hf_models.hf_reference_logits(hf, name, ids, mask, dec)
    model = jt5.T5ForConditionalGeneration.from_pretrained(path, attention="xla")
    out = _forward(model, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask))
    assert_close(out, ref, dtype="float32", check="logits", what=f"{name} logits")

    import torch
    with torch.no_grad():
        enc_ref = hf.encoder(input_ids=torch.as_tensor(ids),
                             attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()
    enc = jt5.T5EncoderModel.from_pretrained(path, attention="xla")
    hidden = _encode(enc, jnp.asarray(ids), jnp.asarray(mask))
    if hf.config.model_type == "longt5":
        # LongT5 masks padded *queries* too (modeling_longt5.py: _get_local_attention_mask), so
        # its states there are an arbitrary average; only token positions mean something.
        keep = mask[..., None] != 0
        hidden, enc_ref = np.where(keep, hidden, 0.0), np.where(keep, enc_ref, 0.0)
    assert_close(hidden, enc_ref, dtype="float32", check="hidden", what=f"{name} encoder")


def test_decoder_attention_mask(variant):
    name, path, hf = variant
    ids, mask, dec = hf_models.inputs(hf.config.vocab_size, batch=2)
    dmask = np.ones_like(dec)
    dmask[1, 15:] = 0
    ref = hf_models.hf_reference_logits(hf, name, ids, mask, dec, dmask)
    model = jt5.T5ForConditionalGeneration.from_pretrained(path, attention="xla")
    out = nnx.jit(lambda m, *a: m(*a))(model, jnp.asarray(ids), jnp.asarray(dec),
                                       jnp.asarray(mask), jnp.asarray(dmask))
    assert_close(out, ref, dtype="float32", check="logits", what=f"{name} decoder mask")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_distributions(variant, dtype):
    """jt5 in bf16/fp16 is as close to the float32 reference as transformers in that dtype."""
    import torch

    name, path, hf = variant
    ids, mask, dec = hf_models.inputs(hf.config.vocab_size)
    ref = hf_models.hf_reference_logits(hf, name, ids, mask, dec)
    model = jt5.T5ForConditionalGeneration.from_pretrained(path, dtype=dtype, attention="xla")
    out = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask)))
    kl = assert_kl(ref, out, dtype=dtype, what=f"{name} {dtype}")
    if dtype == "float16" and hf_models.VARIANTS[name][1].get("encoder_attention_type") == "local":
        # transformers' LongT5LocalAttention adds a -1e10 mask in float16 (-inf): padded query
        # rows become NaN and spread to every row; there is no transformers run to compare with.
        return
    hf_low = hf_models.build(name, path.parent / f"{path.name}-{dtype}", style="v4").to(
        getattr(torch, dtype))
    theirs = hf_models.hf_reference_logits(hf_low, name, ids, mask, dec)
    # no worse than transformers' own low-precision run (with slack for noise at tiny KLs)
    assert kl <= 2 * kl_next_token(ref, theirs) + 1e-5, (name, dtype, kl)


def test_float16_residual_stream_does_not_overflow(tmp_path):
    """Activations beyond float16's range (as in T5 v1.1 xl+) stay finite and correct."""
    import torch

    path = tmp_path / "big"
    hf = hf_models.build("t5-v1_1", path, style="v4")
    ids, mask, dec = hf_models.inputs(hf.config.vocab_size)
    with torch.no_grad():  # blow the residual stream past 65504 in the first encoder layer
        hf.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(3e4)
    hf.save_pretrained(path)
    ref = hf_models.hf_reference_logits(hf, "t5-v1_1", ids, mask, dec)
    model = jt5.T5ForConditionalGeneration.from_pretrained(path, dtype="float16", attention="xla")
    out = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask)))
    assert np.isfinite(out).all()
    assert_kl(ref, out, dtype="float16", what="float16 with overflowing residual")


def test_generation_cache_equals_full_decoder(tmp_path):
    """decode_step over a preallocated cache reproduces the teacher-forced decoder, token by token."""
    path = tmp_path / "m"
    hf_models.build("umt5", path)  # per-layer bias tables: the hardest bias case
    model = jt5.T5ForConditionalGeneration.from_pretrained(path, attention="xla")
    ids, mask, dec = hf_models.inputs(model.config.vocab_size, batch=2, dec_len=9)
    full = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask)))

    @nnx.jit
    def steps(model, ids, mask, dec):
        enc = model.encode(ids, mask)
        cache = model.init_cache(enc, mask, max_length=12)
        outs = []
        for i in range(dec.shape[1]):
            logits, cache = model.decode_step(dec[:, i:i + 1], cache, i)
            outs.append(logits[:, 0])
        return jnp.stack(outs, 1)

    inc = steps(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
    assert_close(inc, full, dtype="float32", check="logits", what="cached decoding")


def test_packed_rows_equal_separate_rows(tmp_path):
    """Two examples packed in one row (segment ids) give the logits each gives alone."""
    path = tmp_path / "m"
    hf_models.build("t5-v1_1", path)
    model = jt5.T5ForConditionalGeneration.from_pretrained(path, attention="xla")
    rng = np.random.default_rng(1)
    a_in, b_in = rng.integers(2, 99, 11), rng.integers(2, 99, 7)
    a_dec, b_dec = rng.integers(2, 99, 5), rng.integers(2, 99, 6)
    a_dec[0] = b_dec[0] = 0
    packed_in = np.concatenate([a_in, b_in, [0, 0]])[None]
    enc_seg = np.array([[1] * 11 + [2] * 7 + [0, 0]])
    packed_dec = np.concatenate([a_dec, b_dec, [0]])[None]
    dec_seg = np.array([[1] * 5 + [2] * 6 + [0]])
    packed = nnx.jit(lambda m, *a: m(a[0], a[1], encoder_segment_ids=a[2],
                                     decoder_segment_ids=a[3]))(
        model, *map(jnp.asarray, (packed_in, packed_dec, enc_seg, dec_seg)))
    alone = nnx.jit(lambda m, a, b: m(a, b))
    alone_a = alone(model, jnp.asarray(a_in[None]), jnp.asarray(a_dec[None]))
    alone_b = alone(model, jnp.asarray(b_in[None]), jnp.asarray(b_dec[None]))
    assert_close(packed[:, :5], alone_a, dtype="float32", check="logits", what="segment 1")
    assert_close(packed[:, 5:11], alone_b, dtype="float32", check="logits", what="segment 2")


def test_parameter_gradients_match_torch(tmp_path):
    """d(loss)/d(params) of jt5 equals transformers' autograd gradients (float32)."""
    import torch
    from jt5.bridge import jt5_to_hf

    path = tmp_path / "m"
    hf = hf_models.build("t5-v1_0", path)
    model = jt5.T5ForConditionalGeneration.from_pretrained(path, attention="xla")
    ids, mask, dec = hf_models.inputs(hf.config.vocab_size, batch=2)
    labels = np.roll(dec, -1, axis=1)
    out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
             decoder_input_ids=torch.as_tensor(dec), labels=torch.as_tensor(labels))
    out.loss.backward()
    ref = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}

    def loss_fn(m):
        logits = m(jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask))
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(lp, jnp.asarray(labels)[..., None], -1))

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    sd, _ = jt5_to_hf(model.config, flat)
    for k, g in sd.items():
        assert_close(g, ref[k], dtype="float32", check="grad", what=k)
