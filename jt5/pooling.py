"""Pooling encoder states into one vector per row: the one implementation ``jt5.embed`` and the
task heads share.

``mean`` averages the states of the real tokens only (``mask`` 1; padding excluded, as
sentence-transformers' mean pooling); ``first`` takes position 0; ``none`` keeps every position
with padding zeroed. Computed in float32.

sentence-transformers' other ``Pooling`` modes (``jt5/sentence.py`` reads them from a model
directory): ``max`` over real tokens, ``mean_sqrt_len`` (the sum over sqrt(token count)),
``weighted_mean`` (position i of the row weighs i + 1; right padding) and ``last`` (the last real
token: T5's EOS).
"""
from __future__ import annotations

import jax.numpy as jnp

POOLINGS = ("mean", "first", "none", "max", "mean_sqrt_len", "weighted_mean", "last")


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
    if pooling == "none":
        return h * m
    if pooling == "max":
        return jnp.max(jnp.where(m > 0, h, -jnp.inf), axis=1)
    if pooling == "mean_sqrt_len":
        return jnp.sum(h * m, axis=1) / jnp.sqrt(jnp.maximum(jnp.sum(m, axis=1), 1.0))
    if pooling == "weighted_mean":
        w = m * jnp.arange(1, h.shape[1] + 1, dtype=jnp.float32)[None, :, None]
        return jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    last = jnp.maximum(jnp.sum(mask != 0, axis=1) - 1, 0)                    # "last": [B]
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
