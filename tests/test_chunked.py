"""The XLA path's chunked attention: equal to the dense oracle, forward and backward, and linear
in memory; the model switches to it above ``CHUNKED_MIN_ELEMENTS`` without changing its output."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jt5
from jt5 import attention_ops
from jt5.pallas_kernels.chunked import chunked_attention
from jt5.pallas_kernels.reference import attention_reference
from jt5.pallas_kernels.spec import Mask, RelativeBias
from tests.conftest import assert_close

B, T, S, N, H = 2, 77, 90, 3, 8  # lengths that are no multiple of the chunks


def _inputs():
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(B, L, N, H)), jnp.float32) for L in (T, S, S))
    return q, k, v, jnp.asarray(r.normal(size=(16, N)), jnp.float32)


def _masks():
    kv = np.ones((B, S), np.int32)
    kv[1, 60:] = 0
    packed_q, packed_kv = np.ones((B, T), np.int32), kv.copy()
    packed_q[0, 40:], packed_kv[0, 45:] = 2, 2
    return {
        # (mask, bias bidirectional, q_offset)
        "none": (Mask(), True, 0),
        "padding": (Mask(kv_segment_ids=jnp.asarray(kv)), True, 0),
        "packing": (Mask(q_segment_ids=jnp.asarray(packed_q),
                         kv_segment_ids=jnp.asarray(packed_kv)), True, 0),
        "causal": (Mask(q_segment_ids=jnp.asarray(packed_q), kv_segment_ids=jnp.asarray(packed_kv),
                        causal=True), False, 0),
        "local_global": (Mask(local_window=9, num_global_tokens=3), True, 0),
        "local_offset": (Mask(local_window=5), True, 4),
    }


@pytest.mark.parametrize("kind", list(_masks()))
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_dense_forward_and_gradients(kind, with_bias):
    q, k, v, table = _inputs()
    mask, bidirectional, q_offset = _masks()[kind]
    table = table if with_bias else None
    w = jnp.cos(jnp.arange(H))

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * w)

    def bias(t):
        return None if t is None else RelativeBias(t, bidirectional, max_distance=20)

    def chunked(q, k, v, t):
        return chunked_attention(q, k, v, mask, bias(t), q_offset=q_offset, block_q=16,
                                 block_k=32)

    def dense(q, k, v, t):
        return attention_reference(q, k, v, mask, bias(t), q_offset=q_offset)

    with jax.default_matmul_precision("highest"):
        assert_close(jax.jit(chunked)(q, k, v, table), dense(q, k, v, table), dtype="float32",
                     check="attention", what=kind)
        argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
        got = jax.jit(jax.grad(loss(chunked), argnums))(q, k, v, table)
        want = jax.grad(loss(dense), argnums)(q, k, v, table)
    for name, g, r in zip("qkvt", got, want):
        assert_close(g, r, dtype="float32", check="attention_grad", what=f"{kind} d{name}")


def test_fully_masked_rows_are_zero():
    q, k, v, table = _inputs()
    qseg = np.ones((B, T), np.int32)
    qseg[:, 70:] = 3  # no key has segment 3
    mask = Mask(q_segment_ids=jnp.asarray(qseg), kv_segment_ids=jnp.ones((B, S), jnp.int32))
    out = chunked_attention(q, k, v, mask, RelativeBias(table), block_q=16, block_k=32)
    assert np.all(np.asarray(out[:, 70:]) == 0) and np.all(np.isfinite(np.asarray(out)))


def _temp_bytes(L: int) -> int:
    spec = jax.ShapeDtypeStruct((1, L, 4, 32), jnp.float32)
    table = jax.ShapeDtypeStruct((32, 4), jnp.float32)

    def loss(q, k, v, t):
        return jnp.sum(chunked_attention(q, k, v, None, RelativeBias(t), block_q=128, block_k=128))

    compiled = jax.jit(jax.grad(loss, (0, 1, 2, 3))).lower(spec, spec, spec, table).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_forward_and_backward_memory_is_linear_in_length():
    """XLA's own buffer assignment: doubling the length at most ~doubles the temporaries (the
    dense path quadruples them: 101 -> 402 -> 1604 MiB at 1k/2k/4k here)."""
    small, large = _temp_bytes(1024), _temp_bytes(4096)
    assert large < 3.0 * small, (small, large)  # linear: ~2.8x for 4x the length; dense: 16x


def test_model_switches_to_chunks_with_the_same_logits_and_gradients(monkeypatch):
    model = jt5.init_model(jt5.preset("tiny").replace(attention="xla"))
    r = np.random.default_rng(0)
    ids = jnp.asarray(r.integers(2, 200, (2, 70)), jnp.int32)
    mask = jnp.asarray(np.arange(70)[None] < np.array([[70], [51]]), jnp.int32)
    dec = jnp.asarray(r.integers(2, 200, (2, 33)), jnp.int32)

    def run():
        def loss(m):
            return jnp.mean(jax.nn.log_softmax(m(ids, dec, mask))[..., 5])
        with jax.default_matmul_precision("highest"):
            value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return float(value), {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}

    dense_loss, dense_grads = run()
    monkeypatch.setattr(attention_ops, "CHUNKED_MIN_ELEMENTS", 2)
    monkeypatch.setattr(attention_ops, "CHUNK", 16)
    plan = attention_ops.make_plan(impl="xla", q_len=70, kv_len=70, mask=attention_ops.Mask())
    assert plan.impl == attention_ops.Chunked(16) and plan.state is None  # nothing dense
    chunked_loss, chunked_grads = run()
    np.testing.assert_allclose(chunked_loss, dense_loss, rtol=1e-5)
    for p, g in dense_grads.items():
        assert_close(chunked_grads[p], g, dtype="float32", check="grad", what=str(p))
