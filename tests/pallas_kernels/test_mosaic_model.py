"""The whole jt5 model with ``attention="mosaic"`` (the Mosaic GPU kernels; on CPU in Mosaic GPU's
interpreter, race detector on) equals ``attention="xla"``: the loss and every parameter's
gradient of a tiny bfloat16 T5 with a padded encoder input (encoder self-attention with the
bidirectional bias, causal decoder self-attention, cross-attention without bias)."""
from __future__ import annotations

import faulthandler

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jt5
from jt5 import attention_ops as ops
from jt5.pallas_kernels import mosaic_common as mc
from tests.conftest import assert_close


@pytest.fixture(autouse=True)
def interpreter(capfd):
    faulthandler.dump_traceback_later(600, exit=True)   # a deadlocked interpreter ends the run
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        mc.reset_interpreter()
    assert "RACE DETECTED" not in capfd.readouterr().out


def _model(attention):
    # d_kv 32: padded to 64 in the kernels; max distance 20: the band and far bias both occur.
    cfg = jt5.preset("tiny", attention=attention, dtype="bfloat16", d_model=48, num_heads=2,
                     d_kv=32, d_ff=64, num_layers=1, relative_attention_max_distance=20)
    return jt5.init_model(cfg, seed=7)


def _loss(model, ids, dec, mask):
    logits = model(ids, dec, mask).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, -1)
    return jnp.mean(lse - jnp.take_along_axis(logits, dec[..., None], -1)[..., 0])


def test_mosaic_model_matches_xla_loss_and_grads():
    rng = np.random.default_rng(0)
    # 150 encoder tokens (19 padding): 4 key blocks, so far blocks beyond the bias band occur
    ids = jnp.asarray(rng.integers(2, 384, (1, 150)))
    mask = jnp.asarray((np.arange(150) < 131)[None].astype(np.int32))
    dec = jnp.asarray(rng.integers(2, 384, (1, 20)))
    out = {}
    for impl in ("xla", "mosaic"):
        model = _model(impl)
        loss, g = nnx.jit(nnx.value_and_grad(_loss))(model, ids, dec, mask)
        out[impl] = loss, {p: v.get_value() for p, v in nnx.to_flat_state(g)}
    assert isinstance(ops.implementation("mosaic", 150, 150), ops.Mosaic)
    (lx, gx), (lm, gm) = out["xla"], out["mosaic"]
    assert_close(lm, lx, dtype="bfloat16", check="loss", what="loss")
    assert set(gm) == set(gx)
    for p in gx:
        assert_close(gm[p], gx[p], dtype="bfloat16", check="grad", what="/".join(map(str, p)))


def test_mosaic_needs_16_bit_activations():
    cfg = jt5.preset("tiny", attention="mosaic", num_layers=1)        # float32 activations
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="bfloat16 or float16 .*dtype='bfloat16'"):
        jt5.init_model(cfg, seed=0)(ids, ids)


def test_mosaic_transient_global_encoder_matches_xla():
    """LongT5 transient-global under "mosaic": the local window on the Mosaic kernel with its
    lse, merged with the side keys (``longt5.global_attention``), equals the dense XLA plan."""
    from jt5 import longt5
    cfg = {impl: jt5.preset("tiny", attention=impl, dtype="bfloat16", d_model=48, num_heads=2,
                            d_kv=32, d_ff=64, num_layers=1, relative_attention_max_distance=20,
                            model_type="longt5", encoder_attention_type="transient-global",
                            local_radius=40, global_block_size=16)
           for impl in ("xla", "mosaic")}
    assert longt5.global_impl(cfg["mosaic"], 150) == "mosaic"
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(2, 384, (1, 150)))
    mask = jnp.asarray((np.arange(150) < 137)[None].astype(np.int32))
    out = {impl: np.asarray(nnx.jit(lambda m: m(ids, mask))(
        jt5.init_model(c, jt5.T5EncoderModel, seed=5)), np.float32) for impl, c in cfg.items()}
    assert_close(out["mosaic"], out["xla"], dtype="bfloat16", check="hidden",
                 what="transient-global encoder")
