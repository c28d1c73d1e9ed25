"""jt5.embed as pipelines call a T5 encoder, each against the reference library on tiny random
models it builds: FLUX / SD3 (diffusers' ``_get_t5_prompt_embeds``: max_length padding, no
attention mask) and Wan (UMT5, masked, zeros past the prompt) reproduced with transformers;
sentence-transformers directories (GTR / sentence-T5 layout) against ``SentenceTransformer``;
bf16 output without a float32 copy; the encoder sharded over fsdp / tensor meshes."""
from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest

import jt5
from tests.conftest import assert_close

TEXTS = ["a red fox jumps over the lazy dog, photorealistic, 8k", "hi", "",
         "x" * 70, "héllo wörld, a café at dusk", "short prompt"]


def _tokenize(model_dir, texts, max_length):
    import transformers
    tok = transformers.ByT5Tokenizer.from_pretrained(model_dir)  # the byte tokenizer files
    return tok(texts, padding="max_length", max_length=max_length, truncation=True,
               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")


def test_flux_sd3_call_equals_diffusers_way(byt5_dir):
    """Pad to max_length, no mask: the padding is attended and every position returned."""
    import torch
    import transformers
    enc = transformers.T5EncoderModel.from_pretrained(byt5_dir, dtype=torch.float32).eval()
    batch = _tokenize(byt5_dir, TEXTS, 64)
    with torch.no_grad():  # diffusers: text_encoder_2(text_input_ids)[0]
        ref = enc(batch.input_ids)[0].numpy()
    got = jt5.embed(byt5_dir, TEXTS, pooling="none", max_length=64, padding="max_length",
                    use_attention_mask=False, batch_size=4, devices=[jax.devices()[0]])
    assert got.embeddings.shape == ref.shape == (len(TEXTS), 64, 32)
    np.testing.assert_array_equal(got.mask, batch.attention_mask.numpy())
    assert_close(got.embeddings, ref, dtype="float32", check="hidden", what="FLUX-style call")
    # the padding matters here: the masked call differs (and zeros the padding by default)
    masked = jt5.embed(byt5_dir, TEXTS, pooling="none", max_length=64, padding="max_length",
                       batch_size=4, devices=[jax.devices()[0]])
    n = int(batch.attention_mask[1].sum())
    assert np.abs(masked.embeddings[1, :n] - ref[1, :n]).max() > 1e-3
    assert not masked.embeddings[1, n:].any()
    with pytest.raises(ValueError, match="padding='max_length'"):
        jt5.embed(byt5_dir, TEXTS, pooling="none", use_attention_mask=False)


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    """A tiny transformers UMT5EncoderModel (a bias table per layer) with byte tokenizer files."""
    import torch
    import transformers

    from jt5.tokenizer import tokenizer_files
    from tests.hf_models import SMALL
    d = tmp_path_factory.mktemp("umt5")
    torch.manual_seed(1)
    cfg = transformers.UMT5Config(**{**SMALL, "vocab_size": 384}, feed_forward_proj="gated-gelu",
                                  tie_word_embeddings=False)
    model = transformers.UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(d)
    for name, content in tokenizer_files("byte").items():
        (d / name).write_bytes(content)
    return d


def test_wan_call_equals_the_pipeline_way(umt5_dir):
    """Wan: masked encoder, states past each prompt's length zeroed, max_length wide."""
    import torch
    import transformers
    enc = transformers.UMT5EncoderModel.from_pretrained(umt5_dir, dtype=torch.float32).eval()
    batch = _tokenize(umt5_dir, TEXTS, 48)
    with torch.no_grad():
        h = enc(batch.input_ids, batch.attention_mask).last_hidden_state
    lens = batch.attention_mask.sum(1)
    ref = torch.stack([torch.cat([u[:v], u.new_zeros(48 - v, u.size(1))])
                       for u, v in zip(h, lens)]).numpy()
    got = jt5.embed(umt5_dir, TEXTS, pooling="none", max_length=48, padding="max_length",
                    use_attention_mask=True, zero_padding=True, batch_size=4,
                    devices=[jax.devices()[0]])
    assert got.embeddings.shape == ref.shape
    assert got.truncated == sum(len(t.encode()) + 1 > 48 for t in TEXTS) == 2
    assert_close(got.embeddings, ref, dtype="float32", check="hidden", what="Wan-style call")
    # zero_padding=False keeps the masked encoder's states at the padding (transformers' too)
    kept = jt5.embed(umt5_dir, TEXTS, pooling="none", max_length=48, padding="max_length",
                     zero_padding=False, batch_size=4, devices=[jax.devices()[0]])
    assert_close(kept.embeddings, h.numpy(), dtype="float32", check="hidden",
                 what="masked, padding states kept")


def test_bfloat16_output_comes_from_the_bfloat16_encoder(umt5_dir):
    one = [jax.devices()[0]]
    kw = dict(pooling="none", max_length=32, padding="max_length", devices=one, dtype="bfloat16")
    bf = jt5.embed(umt5_dir, TEXTS[:3], output_dtype="bfloat16", **kw)
    f32 = jt5.embed(umt5_dir, TEXTS[:3], **kw)  # the same bf16 states, widened on device
    assert bf.embeddings.dtype == ml_dtypes.bfloat16 and f32.embeddings.dtype == np.float32
    np.testing.assert_array_equal(bf.embeddings.astype(np.float32), f32.embeddings)
    with pytest.raises(ValueError, match="output_dtype"):
        jt5.embed(umt5_dir, TEXTS[:1], output_dtype="int8", devices=one)


def _sentence_dir(path, modules, *, prompt=None):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(modules=modules, device="cpu",
                             prompts={"query": prompt} if prompt else None,
                             default_prompt_name="query" if prompt else None)
    st.save(str(path))
    return SentenceTransformer(str(path), device="cpu")


@pytest.fixture(scope="module")
def st_modules():
    pytest.importorskip("sentence_transformers")
    import torch
    from sentence_transformers.sentence_transformer import modules
    return modules, torch


def test_gtr_layout_equals_sentence_transformers(byt5_dir, tmp_path, st_modules):
    """GTR / sentence-T5: mean pooling, a bias-free Dense projection, Normalize; max length 40."""
    modules, torch = st_modules
    torch.manual_seed(0)
    word = modules.Transformer(str(byt5_dir), max_seq_length=40)
    st = _sentence_dir(tmp_path / "gtr", [
        word, modules.Pooling(32, "mean"),
        modules.Dense(32, 24, bias=False, activation_function=torch.nn.Identity()),
        modules.Normalize()])
    ref = st.encode(TEXTS)
    got = jt5.embed(tmp_path / "gtr", TEXTS, batch_size=4, devices=[jax.devices()[0]])
    assert got.embeddings.shape == ref.shape == (len(TEXTS), 24)
    assert got.truncated == sum(len(t.encode()) + 1 > 40 for t in TEXTS) == 2
    assert_close(got.embeddings, ref, dtype="float32", check="hidden", what="GTR layout")
    np.testing.assert_allclose(np.linalg.norm(got.embeddings, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="modules.json"):
        jt5.embed(tmp_path / "gtr", TEXTS, pooling="first")


def test_every_pooling_mode_dense_activation_and_prompt(byt5_dir, tmp_path, st_modules):
    """All of Pooling's modes concatenated, two Dense layers (Tanh with bias, then GELU), a
    default prompt, lower-casing: each is a place where jt5 could differ."""
    modules, torch = st_modules
    torch.manual_seed(1)
    word = modules.Transformer(str(byt5_dir), max_seq_length=48, do_lower_case=True)
    modes = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
    st = _sentence_dir(tmp_path / "all", [
        word, modules.Pooling(32, modes), modules.Dense(32 * len(modes), 20),
        modules.Dense(20, 12, activation_function=torch.nn.GELU())], prompt="Query: ")
    texts = [t.upper() for t in TEXTS]
    ref = st.encode(texts)
    got = jt5.embed(tmp_path / "all", texts, batch_size=4, devices=[jax.devices()[0]])
    assert_close(got.embeddings, ref, dtype="float32", check="hidden",
                 what="all pooling modes + Dense x2 + prompt + lower case")


def test_unsupported_sentence_module_is_one_clear_error(byt5_dir, tmp_path, st_modules):
    import json
    modules, torch = st_modules
    _sentence_dir(tmp_path / "x", [modules.Transformer(str(byt5_dir)),
                                             modules.Pooling(32, "mean")])
    spec = json.loads((tmp_path / "x" / "modules.json").read_text())
    spec.append({"idx": 2, "name": "2", "path": "2_LayerNorm",
                 "type": "sentence_transformers.models.LayerNorm"})
    (tmp_path / "x" / "modules.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="LayerNorm"):
        jt5.embed(tmp_path / "x", TEXTS)


@pytest.mark.parametrize("spec", ["fsdp=4,tensor=2", "data=2,tensor=4"])
def test_sharded_encoder_equals_one_device(byt5_dir, spec):
    """The XXL path: weights split over fsdp / tensor, rows over data x fsdp."""
    from jt5.sharding import make_mesh
    kw = dict(pooling="none", max_length=32, padding="max_length", use_attention_mask=False,
              batch_size=4)
    one = jt5.embed(byt5_dir, TEXTS, devices=[jax.devices()[0]], **kw)
    mesh = make_mesh(spec)
    got = jt5.embed(byt5_dir, TEXTS, mesh=mesh, **kw)
    assert_close(got.embeddings, one.embeddings, dtype="float32", check="hidden",
                 what=f"mesh {spec}")


def test_long_prompt_through_the_chunked_path(byt5_dir):
    """A FLUX-style call past CHUNKED_MIN_ELEMENTS query x key positions runs the chunked
    attention (flash attention in jnp, linear memory) and still equals transformers."""
    import torch
    import transformers

    from jt5.attention_ops import CHUNKED_MIN_ELEMENTS
    L = 1088
    assert L * L >= CHUNKED_MIN_ELEMENTS
    texts = ["a very long prompt, " * 60, "short"]
    enc = transformers.T5EncoderModel.from_pretrained(byt5_dir, dtype=torch.float32).eval()
    batch = _tokenize(byt5_dir, texts, L)
    with torch.no_grad():
        ref = enc(batch.input_ids)[0].numpy()
    got = jt5.embed(byt5_dir, texts, pooling="none", max_length=L, padding="max_length",
                    use_attention_mask=False, batch_size=2, devices=[jax.devices()[0]])
    assert_close(got.embeddings, ref, dtype="float32", check="hidden", what="chunked FLUX call")
