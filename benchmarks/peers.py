"""Peer implementations the benchmarks load the same way (not a dependency of jt5)."""
from __future__ import annotations

from pathlib import Path


def nai_t5_encoder(model_dir, n_tokens: int):
    """nai-t5's encoder (pip ``nai-t5``) with the weights of a transformers T5 directory."""
    from nai_t5.t5_encoder import T5EncoderStack
    from nai_t5.t5_hf import hf_to_based_t5_enc_state, to_based_config
    from safetensors.torch import load_file
    from transformers import T5Config

    cfg = to_based_config(T5Config.from_pretrained(model_dir), n_tokens=n_tokens)
    model = T5EncoderStack(cfg).eval()
    model.load_state_dict(hf_to_based_t5_enc_state(
        load_file(str(Path(model_dir) / "model.safetensors")), cfg))
    return model
