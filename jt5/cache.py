"""Keys/values and the decoding cache: preallocated self-attention K/V plus cross-attention K/V
computed once.

``KV`` knows its layout: ``[B, S, N, H]`` (``"BSNH"``, the kernels' and the projections'
layout) or ``[B, N, S, H]`` (``"BNSH"``, the XLA path's decoding cache: its batched matmuls
want (B, N) leading, and a ``BSNH`` cache would be transposed whole at every step). Each
attention implementation names the layout it wants (``attention_ops.Impl.kv_layout``).

Self-attention slots ``[0, max_length)`` are written in place (``dynamic_update_slice``) as
tokens are decoded; slots not yet written are hidden by the causal mask (their position is after
the query's), so they never need clearing. Cross-attention keys/values depend only on the
encoder output and are computed once at prefill — t5x recomputes them every step.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

LAYOUTS = ("BSNH", "BNSH")


@struct.dataclass
class KV:
    """Keys and values of one attention layer, laid out as ``layout`` says."""
    k: jax.Array
    v: jax.Array
    layout: str = struct.field(pytree_node=False, default="BSNH")

    @property
    def length_axis(self) -> int:
        return self.layout.index("S")

    @property
    def length(self) -> int:
        return self.k.shape[self.length_axis]

    def to(self, layout: str) -> "KV":
        """The same keys/values in ``layout`` (a transpose, or nothing)."""
        if layout not in LAYOUTS:
            raise ValueError(f"KV layout {layout!r} must be one of {LAYOUTS}")
        if layout == self.layout:
            return self
        return KV(self.k.transpose(0, 2, 1, 3), self.v.transpose(0, 2, 1, 3), layout)

    def astype(self, dtype) -> "KV":
        return self.replace(k=self.k.astype(dtype), v=self.v.astype(dtype))

    def write(self, new: "KV", index) -> "KV":
        """``new`` written at positions ``index ..`` of this (preallocated) K/V, in its layout."""
        new = new.to(self.layout).astype(self.k.dtype)
        axis = self.length_axis
        return self.replace(k=jax.lax.dynamic_update_slice_in_dim(self.k, new.k, index, axis),
                            v=jax.lax.dynamic_update_slice_in_dim(self.v, new.v, index, axis))


@struct.dataclass
class Cache:
    """Per decoder layer: self-attention K/V (rows = decoder rows, ``max_length`` slots) and
    cross-attention K/V (rows = inputs, once per input), in the attention's layout."""
    self_kv: tuple[KV, ...]
    cross_kv: tuple[KV, ...]
    encoder_segment_ids: Optional[jax.Array]  # [B, S]: 1 = token, 0 = padding (None: no padding)

    @property
    def max_length(self) -> int:
        return self.self_kv[0].length

    @property
    def encoder_length(self) -> int:
        return self.cross_kv[0].length

    def reorder(self, rows) -> "Cache":
        """Self-attention cache rows ``rows`` (beam search). Cross K/V belong to the inputs and
        are shared by all rows of one input, so they stay."""
        return self.replace(self_kv=jax.tree.map(lambda a: jnp.take(a, rows, axis=0),
                                                 self.self_kv))


def empty_kv(batch: int, max_length: int, num_heads: int, head_dim: int, dtype,
             layout: str) -> KV:
    """Zeroed K/V of ``max_length`` slots in ``layout``."""
    shape = {"BSNH": (batch, max_length, num_heads, head_dim),
             "BNSH": (batch, num_heads, max_length, head_dim)}[layout]
    return KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), layout)
