"""train/step.py: the loss, optimizers and schedules, and the jitted step on a 2x2x2 mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jt5
from jt5 import sharding
from tests.conftest import assert_close
from jt5.train import step as S

MICRO = dict(d_model=32, d_kv=16, num_heads=2, d_ff=64, num_layers=1, num_decoder_layers=1,
             attention="xla")


def micro_config(**kw):
    return jt5.preset("tiny", **{**MICRO, **kw})


def synthetic_batch(B=8, L_in=24, L_tgt=12, vocab=384, seed=0) -> dict:
    """Packed rows like train.data's: two segments per row, then padding."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((B, L), np.int32) for k, L in (
        ("encoder_input_tokens", L_in), ("encoder_segment_ids", L_in), ("encoder_positions", L_in),
        ("decoder_input_tokens", L_tgt), ("decoder_target_tokens", L_tgt),
        ("decoder_segment_ids", L_tgt), ("decoder_positions", L_tgt))}
    for b in range(B):
        for side, L in (("encoder", L_in), ("decoder", L_tgt)):
            cut = int(rng.integers(2, L - 3))
            end = int(rng.integers(cut + 2, L + 1))
            seg = out[f"{side}_segment_ids"][b]
            seg[:cut], seg[cut:end] = 1, 2
            out[f"{side}_positions"][b, :end] = np.r_[np.arange(cut), np.arange(end - cut)]
        tgt = rng.integers(3, vocab, L_tgt).astype(np.int32) * (out["decoder_segment_ids"][b] > 0)
        out["decoder_target_tokens"][b] = tgt
        shifted = np.r_[0, tgt[:-1]]
        shifted[out["decoder_positions"][b] == 0] = 0
        out["decoder_input_tokens"][b] = shifted * (out["decoder_segment_ids"][b] > 0)
        out["encoder_input_tokens"][b] = (rng.integers(3, vocab, L_in) *
                                          (out["encoder_segment_ids"][b] > 0))
    out["decoder_loss_weights"] = (out["decoder_segment_ids"] > 0).astype(np.float32)
    return out


def _setup(cfg, optim, seed=0):
    model = jt5.init_model(cfg, seed=seed)
    graphdef, state = nnx.split(model)
    tx = S.make_optimizer(optim)
    return graphdef, state, tx, S.init_state(nnx.to_pure_dict(state), tx, seed)


def _close_trees(a, b, check, what):
    for (p, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a),
                              jax.tree_util.tree_leaves_with_path(b)):
        assert_close(x, y, dtype="float32", check=check, what=f"{what} {jax.tree_util.keystr(p)}")


def test_loss_terms_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, (3, 5))
    weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
    t = S.loss_terms_from_logits(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                 z_loss=1e-2)
    l64 = logits.astype(np.float64)
    lse = np.log(np.exp(l64).sum(-1))
    ce = lse - np.take_along_axis(l64, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(t.cross_entropy), (weights * ce).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(t.z_loss), (weights * 1e-2 * lse**2).sum(), rtol=1e-5)
    assert float(t.weight) == weights.sum()
    assert float(t.correct) == (weights * (l64.argmax(-1) == targets)).sum()


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("adafactor", marks=pytest.mark.slow)])
def test_sharded_train_step_equals_single_device(optimizer):
    """One jitted, donated train step on a data x fsdp x tensor = 2x2x2 mesh gives the
    single-device loss, gradients and parameter update (float32)."""
    cfg = micro_config()
    optim = S.OptimConfig(optimizer=optimizer, warmup_steps=1, total_steps=10, lr=1e-2)
    graphdef, abstract, tx, state = _setup(cfg, optim, seed=1)
    batch = synthetic_batch()
    grads_fn = lambda p, b: S.grads_and_terms(graphdef, p, b, z_loss=optim.z_loss)  # noqa: E731
    g1, terms1 = jax.jit(grads_fn)(state.params, batch)
    updates1, _ = tx.update(g1, state.opt_state, state.params)  # the reference update, eagerly

    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    param_sh = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh))
    state_sh = S.state_shardings(jax.eval_shape(lambda: state), param_sh, tx, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in batch}
    with jax.set_mesh(mesh):
        state8 = jax.device_put(state, state_sh)
        batch8 = {k: jax.make_array_from_process_local_data(batch_sh[k], v) for k, v in batch.items()}
        g8, _ = jax.jit(grads_fn, in_shardings=(param_sh, batch_sh))(state8.params, batch8)
        step8 = jax.jit(S.make_train_step(graphdef, optim, tx), donate_argnums=0,
                        in_shardings=(state_sh, batch_sh),
                        out_shardings=(state_sh, NamedSharding(mesh, P())))
        new8, m8 = step8(state8, batch8)
    assert state8.params["shared"]["embedding"].is_deleted()  # donated
    wi = new8.params["encoder"]["layers"][0]["mlp"]["wi_0"]
    assert wi.sharding.spec == P("fsdp", "tensor")
    m1 = S._metrics(terms1)
    for k in ("loss", "cross_entropy", "z_loss", "accuracy"):
        assert_close(m8[k], m1[k], dtype="float32", check="logits", what=k)
    assert_close(m8["grad_norm"], optax.tree.norm(g1), dtype="float32", check="grad",
                 what="grad_norm")
    _close_trees(g8, g1, "grad", "grad")
    # Adam's and Adafactor's normalised first update turns float noise on gradients that are
    # ~0 into O(lr) differences; compare the update where the gradient is above that noise.
    for (path, new), old, u1, g in zip(jax.tree_util.tree_leaves_with_path(new8.params),
                                       jax.tree.leaves(state.params), jax.tree.leaves(updates1),
                                       jax.tree.leaves(g1)):
        live = np.abs(np.asarray(g)) > 1e-4 * np.abs(np.asarray(g)).max()
        assert_close(np.where(live, np.asarray(new) - np.asarray(old), 0),
                     np.where(live, np.asarray(u1), 0), dtype="float32", check="grad",
                     what=f"update {jax.tree_util.keystr(path)}")
    assert int(new8.step) == 1


def test_grad_accumulation_equals_full_batch():
    cfg = micro_config()
    base = S.OptimConfig(warmup_steps=0, total_steps=10)
    graphdef, _, tx, state = _setup(cfg, base)
    batch = synthetic_batch(B=8)
    full = jax.jit(lambda p, b: S.grads_and_terms(graphdef, p, b, z_loss=1e-4))(state.params, batch)
    acc = jax.jit(lambda p, b: S.grads_and_terms(graphdef, p, b, z_loss=1e-4, accum_steps=4))(
        state.params, batch)
    _close_trees(acc[0], full[0], "grad", "accumulated grad")
    for a, b in zip(acc[1], full[1]):
        assert_close(a, b, dtype="float32", check="logits", what="loss terms")


def test_schedules_warmup_and_decay():
    def at(schedule, steps, **kw):
        f = S.make_schedule(S.OptimConfig(lr=1.0, warmup_steps=10, total_steps=110,
                                          schedule=schedule, **kw))
        return [float(f(s)) for s in steps]

    np.testing.assert_allclose(at("cosine", [0, 4, 9, 10, 60, 110]),
                               [0.1, 0.5, 1.0, 1.0, 0.55, 0.1], atol=1e-6)
    np.testing.assert_allclose(at("linear", [10, 60, 110, 200]), [1.0, 0.55, 0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(at("rsqrt", [9, 10, 30, 1000]),
                               [1.0, 1.0, np.sqrt(10 / 30), np.sqrt(10 / 1000)], atol=1e-6)
    np.testing.assert_allclose(at("constant", [0, 50, 500]), [0.1, 1.0, 1.0], atol=1e-6)
    assert S.OptimConfig(optimizer="adafactor").peak_lr == S.DEFAULT_LR["adafactor"]
    with pytest.raises(ValueError, match="schedule='exp'"):
        S.OptimConfig(schedule="exp")


def test_bf16_compute_float32_master_weights():
    cfg = micro_config(dtype="bfloat16", param_dtype="float32")
    optim = S.OptimConfig(warmup_steps=0, total_steps=10)
    graphdef, _, tx, state = _setup(cfg, optim)
    new, m = jax.jit(S.make_train_step(graphdef, optim, tx))(state, synthetic_batch())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


def test_dropout_key_depends_on_step_only():
    cfg = micro_config(dropout_rate=0.3)
    optim = S.OptimConfig(warmup_steps=0, total_steps=10)
    graphdef, _, tx, state = _setup(cfg, optim)
    step_fn = jax.jit(S.make_train_step(graphdef, optim, tx, dropout=True))
    batch = synthetic_batch()
    _, a = step_fn(state, batch)
    _, b = step_fn(state, batch)
    _, c = step_fn(state._replace(step=state.step + 1), batch)
    nodrop = jax.jit(S.make_eval_step(graphdef, optim))(state.params, batch)
    assert float(a["loss"]) == float(b["loss"])           # same (rng, step): same masks
    assert float(a["loss"]) != float(c["loss"])           # another step: other masks
    assert float(a["loss"]) != float(nodrop["loss"])      # dropout is on in training only
