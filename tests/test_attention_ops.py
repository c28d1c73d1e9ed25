"""The attention implementations behind ``attention_ops``: each one, over K/V in either cache
layout, equals the dense oracle; a plan re-prepared for another bias (UMT5) equals a fresh one."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jt5 import attention_ops as ops
from jt5.cache import KV
from jt5.pallas_kernels.reference import attention_reference
from tests.conftest import assert_close

B, T, S, N, H = 2, 5, 40, 2, 16


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=(B, L, N, H)), jnp.float32) for L in (T, S, S))
    seg = np.ones((B, S), np.int32)
    seg[1, 30:] = 0
    return q, k, v, jnp.asarray(r.normal(size=(32, N)), jnp.float32), jnp.asarray(seg)


@pytest.mark.parametrize("impl", [ops.XLA(), ops.Chunked(16), ops.Pallas()],
                         ids=lambda i: i.name)
@pytest.mark.parametrize("layout", ["BSNH", "BNSH"])
def test_every_implementation_over_either_layout_equals_the_oracle(impl, layout):
    q, k, v, table, seg = _inputs()
    mask = ops.Mask(kv_segment_ids=seg, causal=True)
    bias = ops.RelativeBias(table, bidirectional=False)
    state = impl.prepare(mask, bias, q_len=T, kv_len=S, q_offset=20)
    plan = ops.Plan(mask=mask, bias=bias, q_offset=20, impl=impl, q_len=T, kv_len=S, state=state)
    with ops.pallas_interpret(True):
        out = ops.attention(q, KV(k, v).to(layout), plan)
    want = attention_reference(q, k, v, mask, bias, q_offset=20)
    assert_close(out, want, dtype="float32", check="attention", what=f"{impl.name} {layout}")


@pytest.mark.parametrize("window,seg_tail", [(3, 30), (0, 40), (60, 7)])
def test_chunked_local_window_equals_the_oracle(window, seg_tail):
    """The chunked path's window tiles (a local window over one sequence, chunks that do not
    divide it, padding keys, a window wider than the input) against the dense oracle, forward
    and gradients."""
    import jax
    from jt5.pallas_kernels import chunked
    r = np.random.default_rng(2)
    q, k, v = (jnp.asarray(r.normal(size=(B, S, N, H)), jnp.float32) for _ in range(3))
    seg = np.ones((B, S), np.int32)
    seg[1, seg_tail:] = 0
    mask = ops.Mask(kv_segment_ids=jnp.asarray(seg), local_window=window)
    table = jnp.asarray(r.normal(size=(32, N)), jnp.float32)
    w = jnp.asarray(r.normal(size=q.shape), jnp.float32)
    plan = ops.Plan(mask=mask, bias=None, q_offset=0, impl=ops.Chunked(16), q_len=S, kv_len=S)
    assert chunked.windowed(mask, S, S, 0)  # the window tiles, not chunked_attention, run

    def loss(fn, q, k, v, table):
        return jnp.sum(fn(q, k, v, ops.RelativeBias(table)) * w)

    def chunk_fn(q, k, v, bias):
        return ops.attention(q, KV(k, v), plan.replace(bias=bias))

    def ref_fn(q, k, v, bias):
        return attention_reference(q, k, v, mask, bias)

    with jax.default_matmul_precision("highest"):
        got = jax.grad(lambda *a: loss(chunk_fn, *a), argnums=(0, 1, 2, 3))(q, k, v, table)
        want = jax.grad(lambda *a: loss(ref_fn, *a), argnums=(0, 1, 2, 3))(q, k, v, table)
        assert_close(chunk_fn(q, k, v, ops.RelativeBias(table)),
                     ref_fn(q, k, v, ops.RelativeBias(table)), dtype="float32",
                     check="attention", what=f"window {window}")
    for name, g, h in zip("qkv", got, want):
        assert_close(g, h, dtype="float32", check="grad", what=f"d{name} window {window}")
    assert_close(got[3], want[3], dtype="float32", check="grad", what="dtable")


def test_with_bias_equals_a_plan_made_with_that_bias():
    q, k, v, table, seg = _inputs(1)
    mask = ops.Mask(kv_segment_ids=seg)
    other = ops.RelativeBias(2.0 * table)
    plan = ops.with_bias(ops.make_plan(impl="xla", q_len=T, kv_len=S, mask=mask,
                                       bias=ops.RelativeBias(table)), other)
    fresh = ops.make_plan(impl="xla", q_len=T, kv_len=S, mask=mask, bias=other)
    np.testing.assert_array_equal(plan.state.bias, fresh.state.bias)
    np.testing.assert_array_equal(plan.state.mask, fresh.state.mask)
    assert_close(ops.attention(q, KV(k, v), plan), attention_reference(q, k, v, mask, other),
                 dtype="float32", check="attention", what="with_bias")



@pytest.mark.parametrize("decode", [False, True])
def test_kernels_run_per_shard_under_a_mesh(decode):
    """On a 2x2x2 (data, fsdp, tensor) mesh the kernels run on each device's rows and heads
    (``per_shard``): outputs and every gradient, bias table included, are the oracle's, and the
    compiled program holds no all-gather of q, k or v (the whole batch on every device)."""
    import jax

    from jt5 import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    r = np.random.default_rng(3)
    Bm, Tm, Sm, Nm = 4, (1 if decode else 24), 24, 2
    q = jnp.asarray(r.normal(size=(Bm, Tm, Nm, H)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(Bm, Sm, Nm, H)), jnp.float32) for _ in range(2))
    table = jnp.asarray(r.normal(size=(32, Nm)), jnp.float32)
    seg = np.ones((Bm, Sm), np.int32)
    seg[1, 17:] = 0
    seg = jnp.asarray(seg)
    off = 9 if decode else 0

    def loss(q, k, v, table, impl):
        mask = ops.Mask(kv_segment_ids=seg, causal=True)
        bias = ops.RelativeBias(table, bidirectional=False)
        if impl is None:  # the oracle
            out = attention_reference(q, k, v, mask, bias, q_offset=off)
        else:
            plan = ops.Plan(mask=mask, bias=bias, q_offset=off, impl=impl, q_len=Tm, kv_len=Sm)
            out = ops.attention(q, KV(k, v), plan)
        return jnp.sum(out * jnp.cos(out)), out

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    want_g, want = grad(q, k, v, table, None)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    place = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", None, "act_heads", None), q.shape, mesh))
    args = [jax.device_put(x, place) for x in (q, k, v)]
    with ops.pallas_interpret(True), jax.set_mesh(mesh):
        step = jax.jit(lambda *a: grad(*a, table, ops.Pallas()))
        got_g, got = step(*args)
        hlo = step.lower(*args).compile().as_text()
    assert_close(got, want, dtype="float32", check="attention", what="per-shard output")
    for name, g, w in zip(("q", "k", "v", "table"), got_g, want_g):
        assert_close(g, w, dtype="float32", check="attention_grad", what=f"per-shard d{name}")
    assert "all-gather" not in hlo, "q/k/v gathered onto every device"
