"""GenerationConfig: checkpoint defaults with transformers' precedence and length semantics.

The oracle is transformers itself: the same directory loaded by both, ``generate`` called with
the same (or no) keywords, the same tokens expected.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import jt5
from jt5 import generate as gen
from jt5.generation_config import FIELDS, GenerationConfig, read_generation_config
from tests import hf_models

pytest.importorskip("torch")
pytest.importorskip("transformers")


class _Cfg:
    vocab_size, eos_token_id, pad_token_id, decoder_start_token_id = 99, 1, 0, 0


def _checkpoint(path, *, config_fields=None, generation_json=None):
    """A tiny t5-v1_1 directory whose config.json has T5's special ids (as real ones do)."""
    hf_models.build("t5-v1_1", path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(eos_token_id=1, pad_token_id=0, **(config_fields or {}))
    (path / "config.json").write_text(json.dumps(raw))
    if generation_json is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_json))
    import transformers
    hf = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    return hf, jt5.T5ForConditionalGeneration.from_pretrained(path, attention="xla")


def _ids():
    rng = np.random.default_rng(3)
    ids = rng.integers(2, 99, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _hf_generate(hf, ids, mask, **kw):
    import torch
    with torch.no_grad():
        return hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                           **kw).numpy()


def _same(ours, ref, what):
    assert ours.shape == ref.shape and (ours == ref).all(), f"{what}\nours\n{ours}\nref\n{ref}"


def test_no_keywords_equals_transformers_defaults(tmp_path):
    """Nothing set anywhere: transformers' max_length=20 default (20 new tokens)."""
    hf, model = _checkpoint(tmp_path)
    ids, mask = _ids()
    ref = _hf_generate(hf, ids, mask)
    assert ref.shape[1] == 21
    _same(model.generate(ids, mask), ref, "no keywords")


def test_config_json_generation_fields(tmp_path):
    """No generation_config.json: config.json's generation fields (from_model_config)."""
    hf, model = _checkpoint(tmp_path, config_fields=dict(num_beams=3, max_length=9,
                                                         no_repeat_ngram_size=2))
    assert model.generation_config.num_beams == 3
    ids, mask = _ids()
    ref = _hf_generate(hf, ids, mask)
    assert ref.shape[1] == 9  # max_length counts the decoder start token
    _same(model.generate(ids, mask), ref, "config.json fields")
    # an explicit argument wins over the checkpoint; max_new_tokens wins over max_length
    _same(model.generate(ids, mask, num_beams=1, max_new_tokens=5),
          _hf_generate(hf, ids, mask, num_beams=1, max_new_tokens=5), "explicit")


def test_generation_config_json_replaces_config_json(tmp_path):
    """With generation_config.json, transformers ignores config.json's generation fields."""
    gen_json = dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, num_beams=2,
                    min_length=6, max_length=8, repetition_penalty=1.5)
    hf, model = _checkpoint(tmp_path, config_fields=dict(num_beams=4, no_repeat_ngram_size=1),
                            generation_json=gen_json)
    assert model.generation_config.no_repeat_ngram_size is None
    ids, mask = _ids()
    _same(model.generate(ids, mask), _hf_generate(hf, ids, mask), "generation_config.json")
    # min_new_tokens wins over min_length
    _same(model.generate(ids, mask, min_new_tokens=2),
          _hf_generate(hf, ids, mask, min_new_tokens=2), "min_new_tokens")


def test_save_pretrained_writes_generation_config(tmp_path):
    _, model = _checkpoint(tmp_path / "a", config_fields=dict(num_beams=3, max_length=7))
    out = tmp_path / "b"
    model.save_pretrained(out)
    written = json.loads((out / "generation_config.json").read_text())
    assert written["num_beams"] == 3 and written["max_length"] == 7
    assert written["eos_token_id"] == 1 and written["decoder_start_token_id"] == 0
    import transformers
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    assert hf.generation_config.num_beams == 3 and hf.generation_config.max_length == 7
    back = jt5.T5ForConditionalGeneration.from_pretrained(out)
    assert back.generation_config == read_generation_config(out, {})
    assert back.generation_config.num_beams == 3


def test_length_semantics_resolve():
    def n(**kw):
        r = GenerationConfig(**kw).resolve(_Cfg)
        return r.max_new_tokens, r.eos_ban_steps

    assert n() == (20, 0)
    assert n(max_length=9) == (8, 0)
    assert n(max_length=9, max_new_tokens=4) == (4, 0)
    assert n(min_length=5) == (20, 4)  # EOS banned while the sequence (with start) is < 5
    assert n(min_length=5, min_new_tokens=2) == (20, 2)
    assert n(min_length=5, eos_token_id=[]) == (20, 0)  # no EOS: nothing to ban
    with pytest.raises(ValueError, match="max_length=1"):
        n(max_length=1)


def test_validation_names_the_field():
    for kw, match in ((dict(num_beams=0), "num_beams=0"), (dict(top_p=1.5), "top_p=1.5"),
                      (dict(repetition_penalty=0.0), "repetition_penalty"),
                      (dict(early_stopping="x"), "early_stopping"),
                      (dict(bad_words_ids=[[]]), "bad_words_ids"),
                      (dict(exponential_decay_length_penalty=(1,)), "exponential_decay"),
                      (dict(max_new_tokens=2.5), "max_new_tokens"),
                      (dict(forced_bos_token_id=-3), "forced_bos_token_id")):
        with pytest.raises(ValueError, match=match):
            GenerationConfig(**kw)
    with pytest.raises(ValueError, match="vocab"):
        GenerationConfig(suppress_tokens=[500]).resolve(_Cfg)
    with pytest.raises(TypeError, match="typical_p"):
        GenerationConfig().replace(typical_p=0.5)
    with pytest.warns(UserWarning, match="typical_p"):
        GenerationConfig.from_dict({"typical_p": 0.5, "num_beams": 2})


def test_fields_cover_the_dataclass():
    import dataclasses
    assert [f.name for f in dataclasses.fields(GenerationConfig)] == list(FIELDS)
    gc = GenerationConfig(bad_words_ids=[[1, 2]], eos_token_id=[1, 2], suppress_tokens=[3])
    assert GenerationConfig.from_dict(gc.to_dict()) == gc
    assert hash(gc)  # frozen and hashable: it may sit in a static jit argument


def test_unknown_argument_is_a_type_error(tmp_path):
    _, model = _checkpoint(tmp_path)
    ids, mask = _ids()
    with pytest.raises(TypeError, match="beams"):
        gen.generate(model, ids, mask, beams=3)
