"""config.scan_layers: one lax.scan over each stack's layers == the unrolled stack (loss and every
gradient, with each remat policy), with the same parameter tree and one compiled layer body."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jt5
from jt5.train import step as S
from tests.conftest import assert_close
from tests.train.test_step import synthetic_batch

CFG = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
           attention="xla", dtype="float32", param_dtype="float32")


def _loss_and_grads(config, batch):
    graphdef, state = nnx.split(jt5.init_model(config, seed=3))
    params = nnx.to_pure_dict(state)
    fn = jax.jit(lambda p, b: S.grads_and_terms(graphdef, p, b, z_loss=1e-4))
    grads, terms = fn(params, batch)
    return params, grads, (terms.cross_entropy + terms.z_loss) / terms.weight


@pytest.mark.parametrize("remat,per_layer_bias", [("none", True), ("dots", False)])
def test_scanned_stack_equals_unrolled(remat, per_layer_bias):
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(B=4, L_in=20, L_tgt=10).items()}
    base = jt5.preset("tiny", **CFG, relative_bias_per_layer=per_layer_bias, remat=remat)
    p0, g0, l0 = _loss_and_grads(base, batch)
    p1, g1, l1 = _loss_and_grads(base.replace(scan_layers=True), batch)
    # the same parameters: layers stay separate modules, so checkpoints and exports are the same
    assert jax.tree.structure(p0) == jax.tree.structure(p1)
    jax.tree.map(np.testing.assert_array_equal, p0, p1)
    assert_close(l1, l0, dtype="float32", check="logits", what="loss")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
        assert_close(a, b, dtype="float32", check="grad", what=jax.tree_util.keystr(path))


def test_scan_compiles_one_layer_body_and_trains_with_dropout():
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(B=4, L_in=20, L_tgt=10).items()}
    base = jt5.preset("tiny", **{**CFG, "num_layers": 6, "num_decoder_layers": 6},
                      dropout_rate=0.1)
    texts = {}
    for scan in (False, True):
        config = base.replace(scan_layers=scan, remat="full")
        graphdef, state = nnx.split(jt5.init_model(config, seed=3))
        params = nnx.to_pure_dict(state)
        fn = jax.jit(lambda p, b: S.grads_and_terms(graphdef, p, b, z_loss=1e-4,
                                                    rng=jax.random.key(7)))
        texts[scan] = fn.lower(params, batch).as_text()
    grads, terms = fn(params, batch)  # the scanned one runs, dropout and remat included
    assert np.isfinite(float(terms.cross_entropy))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    dots = {scan: t.count("dot_general") for scan, t in texts.items()}
    assert "while" in texts[True] and dots[True] * 3 < dots[False], dots
