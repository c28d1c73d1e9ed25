"""jt5: T5 in JAX — Pallas flash attention with in-kernel relative bias, a two-way Hugging Face
bridge, UL2 pretraining and jitted generation.

    import jt5
    model = jt5.T5ForConditionalGeneration.from_pretrained(hf_dir, dtype="bfloat16")
    logits = model(input_ids, decoder_input_ids, attention_mask)
    ids = model.generate(input_ids, attention_mask, max_new_tokens=64, num_beams=4)
    model.save_pretrained(out_dir)
    model = jt5.load("runs/pretrain")   # any format: transformers dir, jt5 checkpoint, run dir
    vectors = jt5.embed(hf_dir, texts, pooling="mean").embeddings   # [N, D] encoder embeddings
"""
from jt5.config import PRESETS, T5Config, preset
from jt5.embeddings import embed
from jt5.formats import load
from jt5.model import (T5EncoderModel, T5ForConditionalGeneration, abstract_model,
                       init_model)

__version__ = "0.1.0"

__all__ = ["T5Config", "PRESETS", "preset", "T5ForConditionalGeneration", "T5EncoderModel",
           "init_model", "abstract_model", "load", "embed", "__version__"]
