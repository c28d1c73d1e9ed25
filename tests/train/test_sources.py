"""train.sources / corpus: Parquet, datasets (save_to_disk and the cache), compressed JSONL,
weighted mixtures, one error line per bad input, and the parallel, resumable token store."""
import gzip
import json

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

from jt5.tokenizer import ByteTokenizer  # noqa: E402
from jt5.train import corpus, sources, tokenize  # noqa: E402
from jt5.train.data import DataConfig, Pipeline, build_token_store, store_path  # noqa: E402

RNG = np.random.default_rng(0)
WORDS = "alpha beta gamma delta héllo wörld ☃ 漢字".split()
TEXTS = [" ".join(RNG.choice(WORDS, int(RNG.integers(1, 40)))) for _ in range(500)]


def _texts(entries, field="text"):
    return [d.read() for d in corpus.iter_documents([str(e) for e in entries], text_field=field)]


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq") / "c4"
    root.mkdir()
    for i, chunk in enumerate((TEXTS[:300], TEXTS[300:])):  # two shards, small row groups
        table = pa.table({"id": np.arange(len(chunk)), "text": chunk, "content": chunk[::-1]})
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=64)
    return root


def test_parquet_files_and_directories_stream_the_text_column(parquet_dir):
    # the oracle: pyarrow's whole-table reader over the dataset, in file order
    want = pq.read_table(parquet_dir / "part-0.parquet").column("text").to_pylist() + \
        pq.read_table(parquet_dir / "part-1.parquet").column("text").to_pylist()
    assert _texts([parquet_dir]) == want == TEXTS
    assert _texts([parquet_dir / "part-1.parquet"], field="content") == TEXTS[300:][::-1]
    keys = [d.key for d in corpus.iter_documents([str(parquet_dir)])]
    assert keys[0] == "c4/part-0.parquet:0" and keys[-1] == "c4/part-1.parquet:199"


def test_saved_and_cached_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))})
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    assert _texts([tmp_path / "saved"]) == ds["text"]
    datasets.DatasetDict(train=ds.select(range(10)), test=ds.select(range(10, 20))).save_to_disk(
        str(tmp_path / "dict"))
    assert _texts([tmp_path / "dict"]) == TEXTS[:10]
    assert _texts([tmp_path / "dict" / "test"]) == TEXTS[10:20]
    # a dataset prepared in the datasets cache (as load_dataset leaves it), read by name offline
    (tmp_path / "src.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    from datasets.packaged_modules.json.json import Json
    Json(dataset_name="my_corpus", data_files={"train": str(tmp_path / "src.jsonl")},
         cache_dir=str(tmp_path / "hf")).download_and_prepare()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    assert _texts(["hf:my_corpus"]) == TEXTS
    assert _texts(["hf:my_corpus/default@train"]) == TEXTS  # NAME/CONFIG: config dir default-<hash>
    with pytest.raises(ValueError, match=r"holds no prepared config 'en', split 'train'"):
        _texts(["hf:my_corpus/en"])
    with pytest.raises(ValueError, match=r"hf:nothing: no dataset 'nothing' in the datasets cache"):
        _texts(["hf:nothing"])
    with pytest.raises(ValueError, match=r"no prepared split 'validation'"):
        _texts(["hf:my_corpus@validation"])


def test_compressed_jsonl_equals_plain(tmp_path):
    lines = "".join(json.dumps({"text": t, "url": "x"}) + "\n" for t in TEXTS).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(lines)
    (tmp_path / "c4.json.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    for name in ("a.jsonl", "a.jsonl.gz", "c4.json.zst"):
        assert _texts([tmp_path / name]) == TEXTS, name


def test_every_bad_input_is_one_error_line_naming_it(tmp_path, parquet_dir, monkeypatch):
    cases = []
    with pytest.raises(ValueError) as e:
        _texts([parquet_dir / "part-0.parquet"], field="body")
    cases.append((e, r"part-0\.parquet: no column 'body' \(columns: id, text, content\); "
                     r"choose one with --text-field"))
    with pytest.raises(ValueError) as e:
        _texts([parquet_dir / "part-0.parquet"], field="id")
    cases.append((e, r"part-0\.parquet: column 'id' is int64, not a string column"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really" * 10)
    with pytest.raises(ValueError) as e:
        _texts([tmp_path / "broken.parquet"])
    cases.append((e, r"broken\.parquet: not a readable Parquet file"))
    gz = gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in TEXTS))
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[:len(gz) // 2])
    with pytest.raises(ValueError) as e:
        _texts([tmp_path / "cut.jsonl.gz"])
    cases.append((e, r"cut\.jsonl\.gz: unreadable after line \d+"))
    for bad, message in (("c4/:abc", r"--data c4/:abc: 'abc' after the last ':' is not a weight"),
                         ("c4/:-1", r"--data c4/:-1: weight -1 must be a positive number"),
                         ("c4/:nan", r"weight nan must be a positive number")):
        with pytest.raises(ValueError) as e:
            sources.parse_sources([bad])
        cases.append((e, message))
    with pytest.raises(ValueError) as e:
        DataConfig(data=(f"{parquet_dir}:0.5", "builtin"))
    cases.append((e, r"give every source a weight or none \(builtin has none\)"))
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)
    (tmp_path / "z.jsonl.zst").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        _texts([tmp_path / "z.jsonl.zst"])
    cases.append((e, r"z\.jsonl\.zst: reading it needs zstandard: pip install 'jt5\[data\]'"))
    for err, message in cases:
        text = str(err.value)
        assert "\n" not in text and err.match(message), text


def test_weighted_mixture_samples_sources_by_weight(tmp_path, parquet_dir):
    (tmp_path / "code.jsonl").write_text("".join(
        json.dumps({"text": "def f(x):\n    return x * " + str(i)}) + "\n" for i in range(400)))
    config = DataConfig(data=(f"{parquet_dir}:0.8", f"{tmp_path / 'code.jsonl'}:0.2"),
                        inputs_length=64, targets_length=32, batch_size=32, seed=0,
                        cache_dir=str(tmp_path / "cache"), heldout_documents=0)
    pipe = Pipeline(config)
    assert pipe.source_weights == [0.8, 0.2]
    assert pipe.store.meta["source_documents"] == [500, 400]
    summary = pipe.source_summary()
    assert f"{parquet_dir}/ x0.8: 500 documents" in summary or f"{parquet_dir} x0.8: 500" in summary
    source = pipe.store.doc_source
    picks = []
    for step in range(40):
        d = pipe._draw(pipe._rng(step), 256)
        picks.append(np.asarray(source[d.doc]))
    share = np.mean(np.concatenate(picks) == 1)
    assert abs(share - 0.2) < 0.02  # 10k draws: 0.2 +- 0.004 (1 sd)
    # the weights only decide sampling: the token store is the unweighted one
    unweighted = DataConfig(**{**config.__dict__, "data": (str(parquet_dir),
                                                           str(tmp_path / "code.jsonl"))})
    assert store_path(unweighted, ByteTokenizer(), 0, 1) == pipe.store.path


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(tokenize, "BLOCK_DOCS", 16)
    monkeypatch.setattr(tokenize, "SAVE_EVERY_S", 0.0)


class Stop(Exception):
    pass


def test_interrupted_tokenisation_resumes_where_it_stopped(tmp_path, parquet_dir, small_blocks,
                                                           monkeypatch):
    config = DataConfig(data=(str(parquet_dir),), cache_dir=str(tmp_path / "cache"),
                        heldout_documents=2)
    whole = build_token_store(config, ByteTokenizer(), 1, 2, workers=1)  # host 1 of 2
    config = DataConfig(**{**config.__dict__, "cache_dir": str(tmp_path / "cache2")})
    encoded = []
    real = ByteTokenizer.encode_many

    def counting(self, texts):
        encoded.extend(texts)
        if len(encoded) > 100 and not getattr(counting, "resumed", False):
            raise Stop  # as if killed mid-corpus
        return real(self, texts)

    monkeypatch.setattr(ByteTokenizer, "encode_many", counting)
    with pytest.raises(Stop):
        build_token_store(config, ByteTokenizer(), 1, 2, workers=1)
    first = len(encoded)
    counting.resumed = True
    again = build_token_store(config, ByteTokenizer(), 1, 2, workers=1)
    total = len(np.asarray(again.doc_index))
    # blocks written before the stop (all but the 2 in flight) were not tokenised again
    assert len(encoded) - first <= total - (first - 3 * 16)
    for a, b in ((whole.tokens, again.tokens), (whole.offsets, again.offsets),
                 (whole.doc_index, again.doc_index)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(np.asarray(again.doc_index).tolist()) <= set(range(1, 500, 2))
    assert not (tmp_path / "cache2" / "tokens" / (again.path.split("/")[-1] + ".partial")).exists()


def test_parallel_tokenisation_equals_one_process(tmp_path, parquet_dir, small_blocks):
    one = build_token_store(DataConfig(data=(str(parquet_dir),), cache_dir=str(tmp_path / "a")),
                            ByteTokenizer(), workers=1)
    two = build_token_store(DataConfig(data=(str(parquet_dir),), cache_dir=str(tmp_path / "b")),
                            ByteTokenizer(), workers=2)
    np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(two.tokens))
    np.testing.assert_array_equal(np.asarray(one.offsets), np.asarray(two.offsets))
    assert one.meta["num_tokens"] == sum(len(t.encode()) for t in TEXTS[:]) - sum(
        len(t.encode()) for i, t in enumerate(TEXTS) if i not in set(np.asarray(one.doc_index)))


def test_pretraining_on_a_weighted_mixture_reports_tokens_per_source(tmp_path, parquet_dir,
                                                                    capsys):
    """Two weighted sources through `loop.run`: the start line names each source's documents and
    tokens, and every metrics line carries the tokens each source gave that step's batch."""
    from jt5.train import loop
    from tests.train.test_loop import loop_config

    (tmp_path / "code.jsonl.gz").write_bytes(gzip.compress("".join(
        json.dumps({"text": "def f(x):\n    return x * " + str(i)}) + "\n"
        for i in range(300)).encode()))
    data = (f"{parquet_dir}:0.5", f"{tmp_path / 'code.jsonl.gz'}:0.5")
    cfg = loop_config(tmp_path / "run", data=data, steps=2, save_every=0, min_chunk=0.5)
    result = loop.run(cfg)
    start = capsys.readouterr().out.splitlines()[0]
    import re
    assert re.search(re.escape(str(parquet_dir)) + r" x0\.5: 49\d documents, [\d,]+ tokens; "
                     r".*code\.jsonl\.gz x0\.5: \d+ documents, [\d,]+ tokens", start), start
    lines = loop.read_metrics(result.out)
    pipe = Pipeline(loop.data_config(cfg))
    for line in lines:
        want = pipe.packed(line["step"] - 1).source_tokens
        got = [line["source_tokens/c4"], line["source_tokens/code.jsonl.gz"]]
        assert got == want.tolist() and min(got) > 0
