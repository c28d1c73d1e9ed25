"""Pooling encoder states into one vector per row: the one implementation ``jt5.embed`` and the
task heads share.

``mean`` averages the states of the real tokens only (``mask`` 1; padding excluded, as
sentence-transformers' mean pooling); ``first`` takes position 0; ``none`` keeps every position
with padding zeroed. Computed in float32.
"""
from __future__ import annotations

import jax.numpy as jnp

POOLINGS = ("mean", "first", "none")


def pool(hidden, mask, pooling: str):
    """``hidden [B, T, D]``, ``mask [B, T]`` (1 = token) -> ``[B, D]`` (``[B, T, D]`` for none)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}")
    h = hidden.astype(jnp.float32)
    m = mask[..., None].astype(jnp.float32)
    if pooling == "mean":
        return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    if pooling == "first":
        return h[:, 0]
    return h * m
