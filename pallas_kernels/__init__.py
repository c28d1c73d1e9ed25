"""GPU kernels (Pallas, Triton lowering) and their pure-jnp references.

Imports nothing from the rest of jt5. ``spec`` is the attention contract (``Mask``,
``RelativeBias``, the ``visible`` predicate and its block form); ``flash_attention`` is T5
attention with the relative position bias computed in-kernel and block-sparse masks;
``reference.attention_reference`` is the oracle; ``blocks`` picks block sizes per device and
``tuning`` measures them.
"""
if __name__ != "jt5.pallas_kernels":  # one module identity: never a second, top-level copy
    raise ImportError(f"import this package as jt5.pallas_kernels, not {__name__}")
from jt5.pallas_kernels.block_mask import BlockMask, classify_blocks, make_block_mask
from jt5.pallas_kernels.blocks import BlockSizes
from jt5.pallas_kernels.flash_attention import flash_attention
from jt5.pallas_kernels.reference import attention_reference
from jt5.pallas_kernels.spec import Mask, RelativeBias, visible

__all__ = ["flash_attention", "BlockSizes", "BlockMask", "make_block_mask", "classify_blocks",
           "attention_reference", "Mask", "RelativeBias", "visible"]
