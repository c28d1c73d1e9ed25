"""The ONE attention dispatch the model calls: ``impl="xla" | "pallas" | "auto"``.

A stack (encoder or decoder) builds a :class:`Plan` once per forward pass — mask, bias spec,
query offset — and every layer calls :func:`attention` with it. On the XLA path the plan holds the
dense ``[1, N, T, S]`` bias and ``[B, 1, T, S]`` mask, computed once per stack rather than per
layer (T5 shares one bias table per stack) — up to ``CHUNKED_MIN_ELEMENTS`` query x key
positions; above that the XLA path runs ``jt5.pallas_kernels.chunked`` (online softmax over query x
key chunks, memory linear in the length, forward and backward). On the Pallas path nothing dense
is ever built: the kernels compute the bias from the ``[K, N]`` table and skip masked blocks
from segment ids.

Semantics of masks, bias and ``q_offset`` are those of ``pallas_kernels/spec.py``, whose ``Mask``
and ``RelativeBias`` this module re-exports; every implementation takes them as they are.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jt5.config import ATTENTION_IMPLS
from jt5.pallas_kernels import reference
from jt5.pallas_kernels.spec import Mask, RelativeBias

__all__ = ["Mask", "RelativeBias", "Plan", "make_plan", "with_bias", "attention",
           "cache_heads_major", "pallas_interpret", "resolve_impl", "segment_ids_from_mask"]

# T x S from which the XLA path attends in chunks. Measured on a 2-core CPU (B=1, N=8, H=64,
# float32, with bias; benchmarks/RESULTS.md "Long inputs"): chunks of 512 are 0.7x the dense
# time at T=S=512, 1.7x faster at 1024, 2.5x at 2048, 2.8x at 4096 — and the dense path's
# [B, N, T, S] scores are what stop it at long inputs.
CHUNKED_MIN_ELEMENTS = 1024 * 1024
CHUNK = 512
_INTERPRET = contextvars.ContextVar("jt5_pallas_interpret", default=None)


@contextlib.contextmanager
def pallas_interpret(interpret: Optional[bool]):
    """Run the Pallas kernels in interpret mode (True), compiled (False) or by backend (None).

    ``pallas_interpret(False)`` on a CPU machine lets ``jax.jit(f).trace(...).lower(
    lowering_platforms=("cuda",))`` run the real Triton lowering of the whole model.
    """
    token = _INTERPRET.set(interpret)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def resolve_impl(impl: str) -> str:
    """``auto`` -> ``pallas`` on a GPU backend, ``xla`` elsewhere."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} must be one of {ATTENTION_IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


@struct.dataclass
class Plan:
    mask: Mask
    bias: Optional[RelativeBias]
    q_offset: jax.Array | int
    impl: str = struct.field(pytree_node=False, default="xla")  # xla | chunked | pallas
    dense_bias: Optional[jax.Array] = None  # xla only: [1, N, T, S] float32
    dense_mask: Optional[jax.Array] = None  # xla only: [B|1, 1, T, S] bool


def cache_heads_major(impl: str) -> bool:
    """Layout of a decoding KV cache: ``[B, N, S, H]`` on the XLA path, ``[B, S, N, H]`` for the
    kernels. XLA's batched matmul wants (B, N) leading; in the kernels' layout it would copy
    (transpose) the whole cache at every decoding step (4-5x slower attention on a CPU)."""
    return resolve_impl(impl) == "xla"


def make_plan(*, impl: str, q_len: int, kv_len: int, mask: Mask,
              bias: Optional[RelativeBias] = None, q_offset=0) -> Plan:
    impl = resolve_impl(impl)
    if impl == "xla" and q_len > 1 and q_len * kv_len >= CHUNKED_MIN_ELEMENTS:
        impl = "chunked"  # nothing [T, S]-sized: bias and mask are made per chunk
    plan = Plan(mask=mask, bias=None, q_offset=q_offset, impl=impl)
    if impl == "xla":
        plan = plan.replace(dense_mask=reference.dense_mask(mask, q_len=q_len, kv_len=kv_len,
                                                            q_offset=q_offset))
    return with_bias(plan, bias, q_len=q_len, kv_len=kv_len)


def with_bias(plan: Plan, bias: Optional[RelativeBias], *, q_len: int, kv_len: int) -> Plan:
    """The same plan with another bias table (UMT5 has one per layer)."""
    dense = None
    if bias is not None and plan.impl == "xla":
        dense = reference.dense_bias(bias, q_len=q_len, kv_len=kv_len, q_offset=plan.q_offset)
    return plan.replace(bias=bias, dense_bias=dense)


def attention(q, k, v, plan: Plan, *, kv_heads_major: bool = False):
    """``[B,T,N,H] x [B,S,N,H] x [B,S,N,H] -> [B,T,N,H]`` (T5: no 1/sqrt(H) scaling).

    ``kv_heads_major``: K/V laid out ``[B, N, S, H]`` — the XLA path's decoding cache (see
    ``cache_heads_major``); the kernels take ``[B, S, N, H]``.
    """
    if plan.impl == "xla":
        return reference.attend_dense(q, k, v, plan.dense_bias, plan.dense_mask,
                                      kv_heads_major=kv_heads_major)
    if kv_heads_major:
        raise ValueError(f"the {plan.impl} attention takes K/V as [B, S, N, H], not heads-major")
    m, b, off = plan.mask, plan.bias, plan.q_offset
    if plan.impl == "chunked":
        from jt5.pallas_kernels.chunked import chunked_attention
        return chunked_attention(q, k, v, m, b, q_offset=off, block_q=CHUNK, block_k=CHUNK)
    if q.shape[1] == 1 and m.local_window is None and not m.num_global_tokens:
        # One query row (a decode step): flash-decoding, split-K over the cache.
        from jt5.pallas_kernels.decode_attention import decode_attention
        return decode_attention(q, k, v, m, b, q_offset=off, interpret=_INTERPRET.get())
    from jt5.pallas_kernels import flash_attention  # the kernels import Pallas; load on first use

    return flash_attention(q, k, v, m, b, q_offset=off, interpret=_INTERPRET.get())


def segment_ids_from_mask(attention_mask, length: int, batch: int):
    """A transformers-style 0/1 attention mask as kv segment ids (1 = token, 0 = padding)."""
    if attention_mask is None:
        return None
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention mask shape {attention_mask.shape} != (batch, length) = "
                         f"{(batch, length)}")
    return (attention_mask != 0).astype(jnp.int32)
