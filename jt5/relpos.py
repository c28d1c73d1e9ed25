"""T5 relative position bias (Raffel et al. 2020 §2.1; Shaw et al. 2018).

Each head learns one scalar per *bucket* of relative distance ``k_pos - q_pos``; the bucket rule
(``jt5.pallas_kernels.spec.relative_position_bucket``) gives exact buckets to short distances and
logarithmic ones up to ``max_distance``. T5/mT5/ByT5 learn one table per stack, shared by all its
layers; UMT5 learns one per layer. The encoder's rule is bidirectional, the decoder's is not.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jt5.attention_ops import RelativeBias
from jt5.config import T5Config
from jt5.layers import param


class RelativePositionBias(nnx.Module):
    def __init__(self, config: T5Config, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.max_distance = config.relative_attention_max_distance
        self.table = param(rngs, (config.relative_attention_num_buckets, config.num_heads),
                           ("relpos_buckets", "heads"),
                           std=config.initializer_factor * config.d_model**-0.5,
                           dtype=jnp.dtype(config.param_dtype))

    def __call__(self) -> RelativeBias:
        return RelativeBias(self.table[...], bidirectional=self.bidirectional,
                            max_distance=self.max_distance)
