"""Model-level checks that need no transformers: presets, sharding, remat, embedding, CLI convert."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jt5
from jt5 import sharding
from tests.conftest import assert_close


def _n_params(model) -> int:
    return sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


# Parameter counts of the released checkpoints (transformers' num_parameters() of
# google-t5/t5-small, t5-base, google/t5-v1_1-small, google/flan-t5-base, google/byt5-small).
@pytest.mark.parametrize("name,count", [
    ("t5-small", 60_506_624), ("t5-base", 222_903_552), ("t5-v1_1-small", 76_961_152),
    ("t5-v1_1-base", 247_577_856), ("byt5-small", 299_637_760)])
def test_preset_parameter_counts(name, count):
    assert _n_params(jt5.abstract_model(jt5.preset(name))) == count


def test_config_validation_messages():
    with pytest.raises(ValueError, match="feed_forward_proj='gated-gelu-x'"):
        jt5.T5Config(feed_forward_proj="gated-gelu-x")
    with pytest.raises(ValueError, match="activation 'tanh'"):
        jt5.T5Config(feed_forward_proj="tanh")
    with pytest.raises(ValueError, match="attention='cuda'"):
        jt5.T5Config(attention="cuda")
    with pytest.raises(KeyError, match="unknown preset 't5-huge'"):
        jt5.preset("t5-huge")
    assert jt5.T5Config(num_layers=3).num_decoder_layers == 3
    assert jt5.T5Config(feed_forward_proj="gated-gelu").activation == "gelu_new"


def _inputs(cfg, B=4, S=12, T=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, cfg.vocab_size, (B, S))
    mask = np.ones((B, S), np.int32)
    mask[1, 8:] = 0
    dec = rng.integers(2, cfg.vocab_size, (B, T))
    return jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask)


def _loss(m, ids, dec, mask):
    logits = m(ids, dec, mask)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, dec[..., None], -1)[..., 0])


def test_sharded_loss_and_grads_equal_single_device():
    """On a 2x2x2 (data, fsdp, tensor) mesh the loss and gradients equal one device's."""
    cfg = jt5.preset("tiny", attention="xla", num_heads=4, d_ff=256)
    model = jt5.init_model(cfg, seed=1)
    args = _inputs(cfg, B=8)
    loss1, g1 = nnx.jit(nnx.value_and_grad(_loss))(model, *args)

    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    graphdef, state = nnx.split(model)
    shard = sharding.param_shardings(state, mesh)
    state = jax.device_put(state, shard)
    wi = state["encoder"]["layers"][0]["mlp"]["wi_0"].get_value()
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    with jax.set_mesh(mesh):
        batch = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in args]
        loss8, g8 = nnx.jit(nnx.value_and_grad(_loss))(nnx.merge(graphdef, state), *batch)
    assert_close(loss8, loss1, dtype="float32", check="logits", what="loss")
    for (p, a), (_, b) in zip(nnx.to_flat_state(g8), nnx.to_flat_state(g1)):
        assert_close(a.get_value(), b.get_value(), dtype="float32", check="grad", what=str(p))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_gradients(remat):
    cfg = jt5.preset("tiny", attention="xla")
    args = _inputs(cfg)
    _, g0 = nnx.jit(nnx.value_and_grad(_loss))(jt5.init_model(cfg), *args)
    _, g1 = nnx.jit(nnx.value_and_grad(_loss))(jt5.init_model(cfg.replace(remat=remat)), *args)
    for (p, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g0)):
        assert_close(a.get_value(), b.get_value(), dtype="float32", check="grad", what=str(p))


def test_one_hot_embedding_equals_gather():
    cfg = jt5.preset("tiny", attention="xla")
    args = _inputs(cfg)
    a = jt5.init_model(cfg)(*args)
    b = jt5.init_model(cfg.replace(one_hot_embedding=True))(*args)
    assert_close(b, a, dtype="float32", check="logits", what="one-hot lookup")


def test_dropout_only_in_training():
    cfg = jt5.preset("tiny", attention="xla", dropout_rate=0.5)
    model = jt5.init_model(cfg)
    args = _inputs(cfg)
    np.testing.assert_array_equal(model(*args), model(*args))
    train = model(*args, deterministic=False, rngs=nnx.Rngs(dropout=0))
    assert not np.allclose(train, model(*args))
    with pytest.raises(ValueError, match="needs rngs"):
        model(*args, deterministic=False)


def test_mask_shape_error_names_shapes():
    cfg = jt5.preset("tiny", attention="xla")
    ids, dec, _ = _inputs(cfg)
    with pytest.raises(ValueError, match=r"attention mask shape \(4, 5\) != \(batch, length\) = \(4, 12\)"):
        jt5.init_model(cfg)(ids, dec, jnp.ones((4, 5)))


def test_mesh_spec_errors():
    with pytest.raises(ValueError, match="bad mesh entry 'model=2'"):
        sharding.parse_mesh("model=2")
    with pytest.raises(ValueError, match="product of the axis sizes"):
        sharding.make_mesh("data=3")
    assert dict(sharding.make_mesh("fsdp=-1,tensor=2").shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_cli_convert_round_trip(tmp_path):
    """jt5 -> orbax -> HF -> jt5 keeps every parameter; the CLI prints what it wrote."""
    from jt5 import cli, weights

    cfg = jt5.preset("tiny", attention="xla")
    model = jt5.init_model(cfg, seed=3)
    weights.save_native(model, tmp_path / "a")
    assert cli.main(["convert", str(tmp_path / "a"), str(tmp_path / "hf")]) == 0
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    back = jt5.load(tmp_path / "b")
    assert back.config.param_dtype == "bfloat16"
    want = weights.model_params(model)
    for p, v in weights.model_params(back).items():
        np.testing.assert_array_equal(v, want[p].astype(v.dtype), err_msg=str(p))
