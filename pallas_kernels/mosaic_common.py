"""What the Mosaic GPU (Hopper) attention kernels share: geometry, options, the producer/consumer
ring of TMA copies, and the few primitives the jax 0.10.2 interpreter cannot run.

Every kernel is FlashAttention-3 shaped (jax's ``pallas/ops/gpu/attention_mgpu.py``): a CTA has
two *compute* warpgroups, each owning ``BLOCK`` = 64 rows (a ``wgmma`` M tile), and one *memory*
warpgroup that streams the blocks the two consume through a ring of ``stages`` shared-memory
slots (TMA copies into a slot complete a "ready" barrier; the compute warpgroups arrive on a
"consumed" barrier when the slot may be refilled). Which blocks are streamed is a row of a
block-sparse table computed outside the kernel (``mosaic_tables``): fully masked blocks are
never visited.

Interpreting (CPU): Mosaic GPU's interpreter simulates shared memory, barriers, TMA and the
warpgroups, with a race detector. Its 0.10.2 version cannot run ``layout_cast`` (so neither
``broadcasted_iota(layout=)`` nor ``plgpu.load``), ``wgmma`` on a transposed ref, ``wgmma`` with
a register operand, nor ``run_state``. The helpers below replace exactly those by plain jnp while
interpreting; every barrier, copy and shared-memory access stays the same code on both paths.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import os
import threading
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jt5.pallas_kernels.spec import Mask, RelativeBias, visible

BLOCK = 64            # rows per compute warpgroup, keys per streamed block
COMPUTE_WGS = 2       # compute warpgroups per CTA (a CTA covers TILE = 128 rows)
TILE = COMPUTE_WGS * BLOCK
LOG2E = math.log2(math.e)
SEMANTICS = ("lane", "warpgroup")
# Registers per thread (setmaxnreg), FA3's split: the memory warpgroup keeps few, the two compute
# ones take the rest of the SM's 64K.
_MEMORY_REGS, _COMPUTE_REGS = 24, 240


@dataclasses.dataclass(frozen=True)
class Options:
    """How the kernels are built and run (hashable: a static argument).

    ``interpret``: run in Mosaic GPU's interpreter (CPU); ``detect_races``: its race detector.
    ``semantics``: ``plgpu.CompilerParams(lowering_semantics=...)``, pinned (jax 0.10 defaults
    to Lane, 0.11 to Warpgroup); ``stages``: slots of the TMA ring.
    """
    interpret: bool = False
    detect_races: bool = True
    semantics: str = "lane"
    stages: int = 2

    def __post_init__(self):
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics={self.semantics!r} must be one of {SEMANTICS}")
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2")

    def compiler_params(self):
        sem = {"lane": plgpu.LoweringSemantics.Lane,
               "warpgroup": plgpu.LoweringSemantics.Warpgroup}[self.semantics]
        return plgpu.CompilerParams(approx_math=True, lowering_semantics=sem)

    def interpret_params(self):
        if not self.interpret:
            return None
        _compile_threads_once()
        # Public as plgpu.InterpretGPUParams from jax 0.11; this path exists in 0.10 and 0.11.
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        return InterpretGPUParams(detect_races=self.detect_races)


_THREAD_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_COMPILE_LOCK = threading.Lock()


def _compile_threads_once() -> None:
    """Make the interpreter compile each simulated thread's program once per kernel instead of
    once per CTA (jax 0.10.2's ``thread_map`` traces, lowers and compiles the whole interpreted
    kernel again at every grid point: ~5 s per CTA on 2 cores, then ~0.2 s). Same programs,
    same results; applied only when interpreting, and only to the function it was written for."""
    from jax._src.pallas.mosaic.interpret import thread_map
    run = getattr(thread_map, "_run_jaxpr", None)
    if run is None or getattr(run, "_jt5_cached", False):
        return
    if list(inspect.signature(run).parameters) != ["jaxpr", "consts", "args"]:
        return

    def cached(jaxpr, consts, *args):
        key = (id(jaxpr), tuple((x.shape, str(x.dtype))
                                for x in jax.tree.leaves((consts, args))))
        with _COMPILE_LOCK:   # the warpgroups of a CTA start together: one compiles, all reuse
            hit = _THREAD_EXECUTABLES.get(key)
            if hit is None:
                def body(consts, *args):
                    jax.core.eval_jaxpr(jaxpr, consts, *args)
                # The jaxpr is kept alive beside its executable: its id() cannot be reused.
                hit = (jax.jit(body).trace(consts, *args).lower().compile(), jaxpr)
                _THREAD_EXECUTABLES[key] = hit
                while len(_THREAD_EXECUTABLES) > 64:
                    _THREAD_EXECUTABLES.popitem(last=False)
        hit[0](consts, *args)
    cached._jt5_cached = True
    thread_map._run_jaxpr = cached


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call (hashable: a ``custom_vjp`` nondiff argument)."""
    sm_scale: float
    mask: Mask              # patterns only (spec.Mask.patterns); kv_len masks keys padded here
    near: Optional[int]     # bias tiles cover block offsets |e| <= near (None: no bias)
    band: Optional[tuple]   # (lo, hi): the reachable offsets in [-near, near] (None: none)
    q_seg: bool             # q segment ids given
    kv_seg: bool            # kv segment ids given
    batched_tables: bool    # block tables have a batch dimension (segment ids)
    bidirectional: bool     # the bias' bucket rule
    max_distance: int
    opts: Options
    dkv_split: bool = False  # dk and dv by separate kernels (one accumulator each: head dim 128)

    def bias(self, table) -> RelativeBias:
        return RelativeBias(table, bidirectional=self.bidirectional,
                            max_distance=self.max_distance)


# Mosaic GPU's interpreter runs the warpgroups of a CTA as concurrent XLA CPU computations that
# block in simulated barrier waits; with fewer threads in XLA's CPU pool than the three
# warpgroups plus their caller, one never starts and the others wait forever.
INTERPRETER_THREADS = 4


def check_interpreter_threads() -> None:
    """Refuse to interpret on a CPU thread pool too small for the warpgroups (a deadlock).
    XLA sizes the pool by the NPROC environment variable, else the number of cores."""
    n = int(os.environ.get("NPROC") or os.cpu_count() or 1)
    if n < INTERPRETER_THREADS:
        raise ValueError(
            f"Mosaic GPU's interpreter needs >= {INTERPRETER_THREADS} XLA CPU threads, this "
            f"process has {n}: set NPROC=8 in the environment before jax starts (XLA's CPU "
            "thread-pool size; the warpgroups of a simulated CTA block on each other)")


def races_found() -> bool:
    """Whether the interpreter's race detector reported a race in the last interpreted kernel."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    races = getattr(gpu_callbacks, "_races", None)
    return bool(races is not None and races.races_found)


def reset_interpreter() -> None:
    """Forget the interpreter's global state (needed after a kernel raised while interpreted)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    gpu_callbacks.reset_gpu_interpret_mode_state()


def launch(body, inputs: dict, out_type, scratch: dict, *, grid, grid_names, opts: Options,
           name: str):
    """``plgpu.kernel`` over ``grid`` with 2 compute + 1 memory warpgroups, called on the
    ``inputs`` that are not None. ``body(refs)`` gets one dict of every ref by name: the inputs,
    the outputs ``out_0, out_1, ...`` and the ``scratch`` buffers and barriers."""
    names = [k for k, x in inputs.items() if x is not None]
    keys = [*names, *(f"out_{i}" for i in range(len(out_type))), *scratch]

    def entry(*refs):
        body(dict(zip(keys, refs)))
    entry.__name__ = name
    call = plgpu.kernel(entry, out_type=list(out_type), scratch_types=list(scratch.values()),
                        grid=grid, grid_names=grid_names, num_threads=COMPUTE_WGS + 1,
                        thread_name="wg", compiler_params=opts.compiler_params(),
                        interpret=opts.interpret_params())
    return call(*(inputs[k] for k in names))


def backward_inputs(q, k, v, do, lse2, delta, meta, table, q_seg, kv_seg, **bias) -> dict:
    """The backward kernels' operands by name (``launch`` drops the None ones)."""
    return dict(q=q, k=k, v=v, do=do, lse=lse2, delta=delta, meta=meta, counts=table.counts,
                indices=table.indices, qseg=q_seg, kseg=kv_seg, **bias)


# ---------------------------------------------------------------------------- shared memory types

def smem_tiles(n: int, rows: int, cols: int, dtype):
    """``[n, rows, cols]`` of a 16-bit dtype, tiled and 128B-swizzled as ``wgmma`` reads it."""
    return plgpu.SMEM((n, rows, cols), dtype,
                      transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def smem_f32_tiles(n: int, rows: int = BLOCK, cols: int = BLOCK):
    """``[n, rows, cols]`` float32 (bias tiles): the one tiling/swizzle a WGMMA-layout load of
    float32 lowers from."""
    return plgpu.SMEM((n, rows, cols), jnp.float32,
                      transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))


def barriers(n: int, arrivals: int = 1):
    return plgpu.Barrier(num_arrivals=arrivals, num_barriers=n)


# ---------------------------------------------------------------------------- interpreter shims

def layout_cast(x, layout, opts: Options):
    return x if opts.interpret else plgpu.layout_cast(x, layout)


def zeros(shape, opts: Options, layout=None):
    layout = plgpu.Layout.WGMMA if layout is None else layout
    return layout_cast(jnp.zeros(shape, jnp.float32), layout, opts)


def full_rows(value, opts: Options):
    """A ``[BLOCK]`` float32 row vector (one value per row of a WGMMA tile)."""
    return layout_cast(jnp.full((BLOCK,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1), opts)


def iota(shape, dim: int, opts: Options):
    """``broadcasted_iota`` in the WGMMA layout (where the scores live)."""
    if opts.interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def load_vector(ref, axis: int, opts: Options):
    """A ``[BLOCK]`` vector from shared memory laid out to broadcast along ``axis`` of a WGMMA
    tile (``axis=1``: one value per row; ``axis=0``: one per column)."""
    if opts.interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis))


def mma_nt(a_smem, b_smem, opts: Options, between: Callable[[], None] = lambda: None):
    """``a @ b.T`` (float32) of two shared-memory tiles ``[m, k]``, ``[n, k]``; ``between``
    runs while the ``wgmma`` is in flight."""
    m, n = a_smem.shape[0], b_smem.shape[0]
    if opts.interpret:
        between()
        return jnp.dot(a_smem[...], b_smem[...].T, preferred_element_type=jnp.float32)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem.T)
        between()
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC((m, n), jnp.float32))


def mma_acc(acc, a, b_smem, opts: Options, after: Callable[[], None] = lambda: None):
    """``acc + a @ b`` with ``a`` in registers (16-bit) and ``b`` a shared-memory tile
    ``[k, n]``; ``after`` runs while the ``wgmma`` is in flight."""
    if opts.interpret:
        acc = acc + jnp.dot(a, b_smem[...], preferred_element_type=jnp.float32)
        after()
        return acc

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)
        after()
    return pl.run_state(body)(plgpu.ACC.init(acc))


def broadcast_rows(x, shape):
    """``[m]`` -> ``[m, n]`` (a value per row)."""
    return lax.broadcast_in_dim(x, shape, [0])


def broadcast_cols(x, shape):
    """``[n]`` -> ``[m, n]`` (a value per column)."""
    return lax.broadcast_in_dim(x, shape, [1])


def mask_tile(x, fill, st: Static, shape, *, q_first, k_first, q_ids=None, k_ids=None,
              transposed: bool = False, positions=None):
    """``x`` where ``spec.visible`` holds on this ``[64, 64]`` tile (rows = queries, or keys when
    ``transposed``), ``fill`` elsewhere; ``(x, applied)``. ``q_ids``/``k_ids``: the per-query /
    per-key segment id vectors (None: absent). ``positions``: the tile's (query, key) index
    iotas made once before the loop (else made here): ptxas keeps the dq and dk kernels at head
    dim 128 spill-free with them hoisted and spills a few bytes without (compile gate). The
    position conditions and the segment ones are applied one after the other."""
    q_dim, k_dim = (1, 0) if transposed else (0, 1)
    along = lambda v, dim: None if v is None else (   # noqa: E731
        broadcast_rows(v, shape) if dim == 0 else broadcast_cols(v, shape))
    applied = False
    q_iota, k_iota = positions if positions is not None else (iota(shape, q_dim, st.opts),
                                                               iota(shape, k_dim, st.opts))
    vis = visible(q_iota + q_first, k_iota + k_first, None, None, st.mask.patterns)
    if vis is not None:
        x, applied = jnp.where(vis, x, fill), True
    vis = visible(0, 0, along(q_ids, q_dim), along(k_ids, k_dim), Mask())
    if vis is not None:
        x, applied = jnp.where(vis, x, fill), True
    return x, applied


# ---------------------------------------------------------------------------- TMA ring

@dataclasses.dataclass(frozen=True)
class Stream:
    """One group of blocks streamed together: ``copies(t, slot)`` issues the TMA copies of step
    ``t`` into ring slot ``slot`` (on that slot's "ready" barriers); ``consumed`` is the group's
    per-slot barrier both compute warpgroups arrive on."""
    copies: Callable
    consumed: object


def produce(streams: Sequence[Stream], n, stages: int):
    """The memory warpgroup: fill the ring for steps ``0 .. n-1`` (``n`` traced), each slot
    refilled once both compute warpgroups consumed it, then await the last consumptions (every
    barrier completion is observed before the barriers' scope ends: the interpreter checks it,
    and on a GPU it keeps the CTA alive until its shared memory is no longer read)."""
    for t in range(stages):
        @pl.when(t < n)
        def _prologue():
            for s in streams:
                s.copies(jnp.int32(t), t)

    @pl.loop(jnp.int32(stages), jnp.maximum(n, stages))
    def _steady(t):
        slot = lax.rem(t, stages)
        for s in streams:
            plgpu.barrier_wait(s.consumed.at[slot])
            s.copies(t, slot)

    @pl.loop(jnp.maximum(n - stages, 0), n)
    def _drain(t):
        for s in streams:
            plgpu.barrier_wait(s.consumed.at[lax.rem(t, stages)])


class Cta(NamedTuple):
    """Where a CTA is and its row of the block table: batch ``b``, head ``h``, table row
    ``row`` (grid axis ``row_axis``), the table's batch index, the full and live block counts,
    and ``q_offset = 64 a + r`` (from the ``meta`` operand)."""
    b: jax.Array
    h: jax.Array
    row: jax.Array
    bm: jax.Array
    n_full: jax.Array
    n_live: jax.Array
    q_off: jax.Array
    a: jax.Array

    def block(self, r, t):
        """The t-th live block of this CTA's table row."""
        return r["indices"][self.bm, self.row, t]


def cta(r, st: Static, row_axis: str) -> Cta:
    b, h, row = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index(row_axis)
    bm = b if st.batched_tables else 0
    return Cta(b, h, row, bm, r["counts"][bm, row, 0], r["counts"][bm, row, 1], r["meta"][0],
               r["meta"][1])


def memory_warpgroup(fn):
    """Run ``fn`` on the memory warpgroup (index ``COMPUTE_WGS``) with few registers."""
    @pl.when(lax.axis_index("wg") == COMPUTE_WGS)
    def _():
        plgpu.set_max_registers(_MEMORY_REGS, action="decrease")
        fn()


def compute_warpgroups(fn):
    """Run ``fn(wg)`` on the two compute warpgroups with the registers the memory one gave up."""
    @pl.when(lax.axis_index("wg") < COMPUTE_WGS)
    def _():
        plgpu.set_max_registers(_COMPUTE_REGS, action="increase")
        fn(lax.axis_index("wg"))
