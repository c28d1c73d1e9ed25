"""Hugging Face / PyTorch <-> jt5 checkpoints, both ways. The only place transformers names appear.

    from jt5.bridge import hf_to_jt5, jt5_to_hf              # pure numpy conversion
    config, params = hf_to_jt5(state_dict, hf_config)   # params: {jt5 path tuple: np.ndarray}
    state_dict, hf_config = jt5_to_hf(config, params)

Files and names only: the bridge never imports the model. ``jt5.weights`` assembles models from
what it reads (``from_pretrained``) and gathers their parameters for it to write.
"""
if __name__ != "jt5.bridge":  # one module identity: never a second, top-level copy
    raise ImportError(f"import this package as jt5.bridge, not {__name__}")
from jt5.bridge.hf import (CheckpointError, StateDict, hf_to_jt5, jt5_to_hf, read_config,
                           write_hf_dir)

__all__ = ["CheckpointError", "StateDict", "hf_to_jt5", "jt5_to_hf", "read_config",
           "write_hf_dir"]
