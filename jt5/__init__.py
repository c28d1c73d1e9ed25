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
import os as _os

# jt5.bridge, jt5.train and jt5.pallas_kernels live in the repository's top-level folders
# bridge/, train/, pallas_kernels/ (pyproject maps them into the jt5 package when installed). In a
# source checkout run with PYTHONPATH=. the folder above this one holds them: search it too, so
# they resolve as jt5.* there as well. Nothing is ever installed as a top-level ``bridge`` or
# ``train`` that a user's own bridge.py / train.py could shadow (or be shadowed by).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "bridge")) and all(
        _os.path.isfile(_os.path.join(_root, d, "__init__.py"))
        for d in ("bridge", "train", "pallas_kernels")):
    __path__.append(_root)

from jt5.config import PRESETS, T5Config, preset
from jt5.embeddings import embed
from jt5.formats import load
from jt5.heads import (T5EncoderForSequenceClassification, T5ForQuestionAnswering,
                       T5ForSequenceClassification, T5ForTokenClassification)
from jt5.model import (T5EncoderModel, T5ForConditionalGeneration, abstract_model,
                       init_model)

__version__ = "0.1.0"

__all__ = ["T5Config", "PRESETS", "preset", "T5ForConditionalGeneration", "T5EncoderModel",
           "init_model", "abstract_model", "load", "embed", "__version__",
           "T5ForSequenceClassification", "T5ForTokenClassification", "T5ForQuestionAnswering",
           "T5EncoderForSequenceClassification"]
