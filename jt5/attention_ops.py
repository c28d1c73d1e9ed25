"""The ONE attention dispatch the model calls: ``attention="xla" | "pallas" | "mosaic" | "cudnn"
| "auto"``.

Each implementation of the contract is an :class:`Impl`: ``prepare`` runs once per stack
(encoder or decoder) and returns its own pytree of what every layer shares, ``attend`` runs per
layer, ``kv_layout`` is the decoding cache layout it wants (``jt5.cache.KV``). A stack builds a
:class:`Plan` (mask, bias, query offset, the implementation and its prepared state) with
:func:`make_plan`; every layer calls :func:`attention` with it.

- :class:`XLA`: dense ``[1, N, T, S]`` bias and ``[B, 1, T, S]`` mask prepared once per stack
  (T5 shares one bias table per stack); cache heads-major ``[B, N, S, H]``.
- :class:`Chunked`: the XLA path from ``CHUNKED_MIN_ELEMENTS`` query x key positions on
  (``jt5.pallas_kernels.chunked``: online softmax over chunks, memory linear in the length,
  forward and backward); nothing prepared.
- :class:`Pallas`: the kernels compute the bias from the ``[K, N]`` table and skip masked blocks
  from segment ids; nothing dense is ever built. One query row runs flash-decoding.
- :class:`CuDNN`: cuDNN's fused attention with the XLA path's dense bias and mask (GPU only).
- :class:`Mosaic`: the Pallas Mosaic GPU kernels (Hopper: TMA, ``wgmma``, warp specialisation;
  bfloat16/float16), same contract as :class:`Pallas`; a decode step runs Pallas' flash-decoding.
  On a CPU they run in Mosaic GPU's interpreter. Opt-in (``MOSAIC_IN_AUTO``).

``auto`` is the kernels on a GPU, unless a compiled probe of them fails there
(``kernel_failure``): then the XLA path, with one warning naming the reason.

Semantics of masks, bias and ``q_offset`` are those of ``pallas_kernels/spec.py``, whose ``Mask``
and ``RelativeBias`` this module re-exports; every implementation takes them as they are.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import struct

from jt5.cache import KV
from jt5.config import ATTENTION_IMPLS
from jt5.pallas_kernels import reference
from jt5.pallas_kernels.spec import Mask, RelativeBias

__all__ = ["Mask", "RelativeBias", "Impl", "XLA", "Chunked", "Pallas", "CuDNN", "Mosaic", "Plan",
           "make_plan", "with_bias", "attention", "kv_layout", "pallas_interpret", "resolve_impl",
           "kernel_failure", "per_shard", "segment_ids_from_mask"]

# T x S from which the XLA path attends in chunks. Measured on a 2-core CPU (B=1, N=8, H=64,
# float32, with bias; benchmarks/RESULTS.md "Long inputs"): chunks of 512 are 0.7x the dense
# time at T=S=512, 1.7x faster at 1024, 2.5x at 2048, 2.8x at 4096 — and the dense path's
# [B, N, T, S] scores are what stop it at long inputs.
CHUNKED_MIN_ELEMENTS = 1024 * 1024
CHUNK = 512
_INTERPRET = contextvars.ContextVar("jt5_pallas_interpret", default=None)
# Whether attention="auto" picks the Mosaic GPU kernels on Hopper (sm_90). Off until a GPU run of
# benchmarks/gpu.sh has checked them against the reference there (they are verified on CPU only:
# interpreter tests and an sm_90a compile gate); attention="mosaic" opts in meanwhile.
MOSAIC_IN_AUTO = False


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
    """``auto`` -> ``pallas`` on a GPU backend whose compiler takes the kernels (``kernel_failure``
    is None), ``xla`` elsewhere."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} must be one of {ATTENTION_IMPLS}")
    if impl == "auto":
        if jax.default_backend() != "gpu":
            return "xla"
        if MOSAIC_IN_AUTO and getattr(jax.devices()[0], "compute_capability", "") == "9.0":
            return "mosaic"
        return "xla" if kernel_failure() else "pallas"
    return impl


def kernel_failure(device=None) -> Optional[str]:
    """Why the Pallas kernels do not lower or compile for ``device`` (default: jax's first), or
    None when they do: ``attention="auto"``'s safety net on a GPU nobody has run them on.

    A probe is compiled (not run) once per kind of device: flash attention forward and backward
    with T5's bias, causal and segment masks, and flash-decoding, bfloat16, head dim 64. A
    failure is logged once, naming the reason; ``auto`` then takes the XLA path."""
    device = jax.devices()[0] if device is None else device
    return _kernel_failure(device.platform, device.device_kind, device)


@functools.lru_cache(maxsize=None)
def _kernel_failure(platform: str, kind: str, device) -> Optional[str]:
    import concurrent.futures
    try:
        # In a thread of its own: resolve_impl runs while a model is traced, often under a
        # mesh, and jax's trace and mesh contexts are per thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(_compile_probe, device).result()
    except Exception as e:  # noqa: BLE001  (whatever the lowering or the compiler raises)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        logging.getLogger(__name__).warning(
            "attention='auto': the Pallas kernels do not compile for %s (%s: %s); using the "
            "XLA attention path", kind, type(e).__name__, reason)
        return f"{type(e).__name__}: {reason}"
    return None


def _compile_probe(device) -> None:
    from jt5.pallas_kernels.blocks import compile_target
    from jt5.pallas_kernels.decode_attention import decode_attention
    from jt5.pallas_kernels.flash_attention import flash_attention

    one = jax.sharding.SingleDeviceSharding(device)
    B, T, N, H = 2, 256, 4, 64
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=one)
    table = jax.ShapeDtypeStruct((32, N), jnp.float32, sharding=one)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=one)

    def probe(q, k, v, table, seg):
        mask = Mask(q_segment_ids=seg, kv_segment_ids=seg, causal=True)
        bias = RelativeBias(table, bidirectional=False)

        def loss(q, k, v, table):
            out = flash_attention(q, k, v, mask, RelativeBias(table, bidirectional=False),
                                  interpret=False)
            return jnp.sum(out.astype(jnp.float32))
        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, table)
        step = decode_attention(q[:, :1], k, v, Mask(kv_segment_ids=seg), bias, q_offset=7,
                                interpret=False)
        return grads, step

    with compile_target(device):
        jax.jit(probe).lower(q, q, q, table, seg).compile()


class Impl:
    """One implementation of the attention contract. A new one (e.g. cuDNN through
    ``jax.nn.dot_product_attention``) is a subclass and a line in :func:`implementation`."""
    name: ClassVar[str]
    kv_layout: ClassVar[str] = "BSNH"   # the decoding cache layout it wants (jt5.cache.KV)

    def prepare(self, mask: Mask, bias: Optional[RelativeBias], *, q_len: int, kv_len: int,
                q_offset, state=None) -> Any:
        """A pytree every layer of a stack shares (None: nothing). ``state``: an earlier result
        for the same mask, redone for another bias only (UMT5's per-layer tables)."""
        return None

    def attend(self, q, kv: KV, plan: "Plan"):
        """``[B, T, N, H]`` queries over ``kv`` -> ``[B, T, N, H]`` (T5: no 1/sqrt(H))."""
        raise NotImplementedError


@struct.dataclass
class DenseTerms:
    """The XLA path's per-stack state: the dense bias and mask of ``reference``."""
    bias: Optional[jax.Array]  # [1, N, T, S] float32
    mask: Optional[jax.Array]  # [B|1, 1, T, S] bool


@dataclasses.dataclass(frozen=True)
class XLA(Impl):
    """Dense attention by XLA (``reference.attend_dense``); reads a heads-major cache in place."""
    name: ClassVar[str] = "xla"
    kv_layout: ClassVar[str] = "BNSH"

    def prepare(self, mask, bias, *, q_len, kv_len, q_offset, state=None):
        dense_mask = (reference.dense_mask(mask, q_len=q_len, kv_len=kv_len, q_offset=q_offset)
                      if state is None else state.mask)
        dense_bias = (None if bias is None else
                      reference.dense_bias(bias, q_len=q_len, kv_len=kv_len, q_offset=q_offset))
        return DenseTerms(bias=dense_bias, mask=dense_mask)

    def attend(self, q, kv, plan):
        st = plan.state
        if kv.layout == "BSNH":
            return reference.attend_dense(q, kv.k, kv.v, st.bias, st.mask)
        # [B, N, S, H]: the matmuls read the cache in place (no transpose of the whole cache)
        s = jnp.einsum("BNTH,BNSH->BNTS", q.transpose(0, 2, 1, 3), kv.k,
                       preferred_element_type=jnp.float32)
        p, _ = reference.masked_softmax(s, st.bias, st.mask)
        o = jnp.einsum("BNTS,BNSH->BNTH", p.astype(kv.v.dtype), kv.v,
                       preferred_element_type=jnp.float32)
        return o.transpose(0, 2, 1, 3).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class Chunked(Impl):
    """The XLA path for long inputs: ``jt5.pallas_kernels.chunked`` in chunks of ``block``
    (``window_attention`` for a local window, ``chunked_attention`` for everything else)."""
    name: ClassVar[str] = "chunked"
    block: int = 512

    def attend(self, q, kv, plan):
        from jt5.pallas_kernels import chunked
        kv = kv.to("BSNH")
        if chunked.windowed(plan.mask, q.shape[1], kv.k.shape[1], plan.q_offset):
            # A local window (LongT5, local attention on T5): one tile of offsets per chunk.
            out, _ = chunked.window_attention(q, kv.k, kv.v, plan.mask, plan.bias,
                                              block_q=self.block)
            return out.astype(q.dtype)
        return chunked.chunked_attention(q, kv.k, kv.v, plan.mask, plan.bias,
                                         q_offset=plan.q_offset, block_q=self.block,
                                         block_k=self.block)


@dataclasses.dataclass(frozen=True)
class Pallas(Impl):
    """The Pallas kernels: flash attention, flash-decoding for one query row."""
    name: ClassVar[str] = "pallas"

    def attend(self, q, kv, plan):
        m, b, off = plan.mask, plan.bias, plan.q_offset
        kv = kv.to("BSNH")
        if q.shape[1] == 1 and m.local_window is None and not m.num_global_tokens:
            # One query row (a decode step): flash-decoding, split-K over the cache.
            from jt5.pallas_kernels.decode_attention import decode_attention
            return per_shard(decode_attention, q, kv.k, kv.v, m, b, q_offset=off)
        from jt5.pallas_kernels import flash_attention  # imports Pallas: load on first use
        return per_shard(flash_attention, q, kv.k, kv.v, m, b, q_offset=off)


@dataclasses.dataclass(frozen=True)
class Mosaic(Pallas):
    """The Mosaic GPU kernels (``jt5.pallas_kernels.mosaic_attention``) for Hopper; a decode
    step (one query row) runs Pallas' flash-decoding as :class:`Pallas` does."""
    name: ClassVar[str] = "mosaic"

    def attend(self, q, kv, plan):
        m = plan.mask
        if q.shape[1] == 1 and m.local_window is None and not m.num_global_tokens:
            return super().attend(q, kv, plan)
        from jt5.pallas_kernels.mosaic_attention import mosaic_attention  # imports Pallas
        kv = kv.to("BSNH")
        return per_shard(mosaic_attention, q, kv.k, kv.v, m, plan.bias, q_offset=plan.q_offset)


_QKV = ("batch", None, "act_heads", None)  # [B, T, N, H]


def per_shard(kernel, q, k, v, mask: Mask, bias: Optional[RelativeBias], *, q_offset=0,
              return_lse: bool = False):
    """``kernel(q, k, v, mask, bias, q_offset=..., interpret=...)`` on each device's rows and
    heads under the active mesh (rows over data x fsdp, heads over tensor, as
    ``jt5.sharding`` splits the activations), by ``jax.shard_map``.

    A Pallas kernel is one custom call that XLA's SPMD partitioner cannot split: called on
    sharded arrays it gathers the whole batch onto every device and computes all of it there
    (``jt5 plan``: a 2 x 8 H100 train step ran every layer's attention over all 256 rows on each
    GPU). Without a mesh, or with nothing split, the kernel is called as is."""
    kw = dict(q_offset=q_offset, interpret=_INTERPRET.get())
    if return_lse:
        kw["return_lse"] = True
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return kernel(q, k, v, mask, bias, **kw)
    from jax.sharding import PartitionSpec as P

    from jt5.sharding import logical_to_spec
    qs, ks = logical_to_spec(_QKV, q.shape, mesh), logical_to_spec(_QKV, k.shape, mesh)
    rows, heads = (qs[0], qs[2]) if (qs[0], qs[2]) == (ks[0], ks[2]) else (None, None)
    if rows is None and heads is None:
        return kernel(q, k, v, mask, bias, **kw)
    spec = P(rows, None, heads, None)
    args = {"q": q, "k": k, "v": v, "q_offset": jnp.asarray(q_offset, jnp.int32)}
    specs = {"q": spec, "k": spec, "v": spec, "q_offset": P()}
    if bias is not None:
        args["table"], specs["table"] = bias.table, P(None, heads)
    for name in ("q_segment_ids", "kv_segment_ids"):
        if getattr(mask, name) is not None:
            args[name], specs[name] = getattr(mask, name), P(rows, None)

    def local(a):
        m = mask.replace(q_segment_ids=a.get("q_segment_ids"),
                         kv_segment_ids=a.get("kv_segment_ids"))
        b = None if bias is None else bias.replace(table=a["table"])
        return kernel(a["q"], a["k"], a["v"], m, b, **dict(kw, q_offset=a["q_offset"]))

    out_specs = (spec, P(rows, heads, None)) if return_lse else spec
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out_specs,
                         check_vma=False)(args)


@dataclasses.dataclass(frozen=True)
class CuDNN(XLA):
    """cuDNN's fused attention (``jax.nn.dot_product_attention(implementation="cudnn")``) with
    T5's dense bias and mask prepared once per stack as for :class:`XLA`: the vendor baseline
    beside the kernels, and ``jt5 plan`` compiles it too. The dense ``[B, N, T, S]`` bias makes
    it quadratic in memory (short inputs). bfloat16 / float16 only; a decode step (one query
    row) takes the XLA path."""
    name: ClassVar[str] = "cudnn"
    kv_layout: ClassVar[str] = "BSNH"

    def attend(self, q, kv, plan):
        if q.shape[1] == 1:
            return super().attend(q, kv, plan)
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention='cudnn' needs bfloat16 or float16 inputs, got {q.dtype} "
                             "(set dtype='bfloat16')")
        st = plan.state
        kv = kv.to("BSNH")
        bias = None if st.bias is None else st.bias.astype(q.dtype)
        out = jax.nn.dot_product_attention(q, kv.k, kv.v, bias=bias, mask=st.mask, scale=1.0,
                                           implementation="cudnn")
        if st.mask is None:
            return out
        # The contract gives zeros for a query that sees no key; cuDNN a uniform average.
        seen = jnp.any(st.mask, axis=-1)[:, 0, :, None, None]    # [B|1, T, 1, 1]
        return jnp.where(seen, out, jnp.zeros((), out.dtype))


def implementation(impl: str, q_len: int = 1, kv_len: int = 1) -> Impl:
    """The implementation for ``attention=impl`` and these lengths: ``xla`` is chunked from
    ``CHUNKED_MIN_ELEMENTS`` query x key positions on (more than one query row)."""
    impl = resolve_impl(impl)
    if impl == "pallas":
        return Pallas()
    if impl == "cudnn":
        return CuDNN()
    if impl == "mosaic":
        return Mosaic()
    if q_len > 1 and q_len * kv_len >= CHUNKED_MIN_ELEMENTS:
        return Chunked(CHUNK)  # nothing [T, S]-sized: bias and mask are made per chunk
    return XLA()


def kv_layout(impl: str) -> str:
    """The decoding cache layout of ``attention=impl`` (``XLA``: heads-major ``[B, N, S, H]``;
    in ``[B, S, N, H]`` its matmuls would transpose the whole cache at every step, 4-5x slower
    attention on a CPU; the kernels: ``[B, S, N, H]``)."""
    return implementation(impl).kv_layout


@struct.dataclass
class Plan:
    """What every layer of one stack shares: the spec objects, the implementation and its
    prepared state (``impl.prepare``)."""
    mask: Mask
    bias: Optional[RelativeBias]
    q_offset: jax.Array | int
    impl: Impl = struct.field(pytree_node=False)
    q_len: int = struct.field(pytree_node=False)
    kv_len: int = struct.field(pytree_node=False)
    state: Any = None


def make_plan(*, impl: str, q_len: int, kv_len: int, mask: Mask,
              bias: Optional[RelativeBias] = None, q_offset=0) -> Plan:
    """The plan of one stack: ``implementation(impl, q_len, kv_len)`` and its prepared state."""
    chosen = implementation(impl, q_len, kv_len)
    state = chosen.prepare(mask, bias, q_len=q_len, kv_len=kv_len, q_offset=q_offset)
    return Plan(mask=mask, bias=bias, q_offset=q_offset, impl=chosen, q_len=q_len,
                kv_len=kv_len, state=state)


def with_bias(plan: Plan, bias: Optional[RelativeBias]) -> Plan:
    """The same plan with another bias table (UMT5 has one per layer)."""
    state = plan.impl.prepare(plan.mask, bias, q_len=plan.q_len, kv_len=plan.kv_len,
                              q_offset=plan.q_offset, state=plan.state)
    return plan.replace(bias=bias, state=state)


def attention(q, kv: KV, plan: Plan):
    """``[B, T, N, H]`` queries over ``kv`` (any layout) -> ``[B, T, N, H]``."""
    return plan.impl.attend(q, kv, plan)


def segment_ids_from_mask(attention_mask, length: int, batch: int):
    """A transformers-style 0/1 attention mask as kv segment ids (1 = token, 0 = padding)."""
    if attention_mask is None:
        return None
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != (batch, length):
        raise ValueError(f"attention mask shape {attention_mask.shape} != (batch, length) = "
                         f"{(batch, length)}")
    return (attention_mask != 0).astype(jnp.int32)
