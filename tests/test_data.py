"""The data pipeline: sources, errors, tokenizer cache, token files and the batch stream."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from homestar.data import (EOT, Source, TokenStream, load_tokenizer, load_tokens, resolve_source,
                           tokenizer_hash)
from homestar.data import tokenizer as tokenizer_mod
from homestar.data import tokens as tokens_mod
from homestar.errors import CheckpointError, ConfigError, DataError

WORDS = ("the cat sat on a warm mat while rain fell over quiet hills and rivers ran "
         "café naïve 東京 λ → def return import class").split()


def prose(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


def write_corpus(folder: Path, n_docs: int = 12, words: int = 300) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:02d}.{'md' if i % 3 == 0 else 'txt'}").write_text(prose(words, i), "utf-8")
    return folder


def list_source(texts: list[str], fingerprint: str = "f" * 64) -> Source:
    return Source(spec="mem", kind="files", description="in memory", fingerprint=fingerprint,
                  read=lambda: iter(texts))


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# -- sources ----------------------------------------------------------------------------------

def test_folder_source_reads_supported_files_in_path_order(corpus):
    (corpus / "sub").mkdir()
    (corpus / "sub" / "z.jsonl").write_text('{"text": "from jsonl"}\n\n{"text": ""}\n', "utf-8")
    (corpus / ".hidden.txt").write_text("secret", "utf-8")
    (corpus / "image.png").write_bytes(b"\x89PNG\x00\x00")
    src = resolve_source(str(corpus))
    texts = list(src.iter_texts())
    assert src.kind == "files" and "13 files" in src.description
    assert texts[:12] == [prose(300, i) for i in range(12)]
    assert texts[12:] == ["from jsonl"]
    assert list(src.iter_texts()) == texts


def test_relative_path_is_kept_absolute_for_resume(corpus, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    src = resolve_source("corpus")
    assert src.spec == str(corpus.resolve())
    assert "12 files in corpus (.md, .txt, " in src.description
    assert resolve_source(src.spec).fingerprint == src.fingerprint


def test_fingerprint_is_stable_and_follows_content(corpus):
    first = resolve_source(str(corpus)).fingerprint
    assert resolve_source(str(corpus)).fingerprint == first
    (corpus / "doc01.txt").write_text("changed text\n", "utf-8")
    assert resolve_source(str(corpus)).fingerprint != first


def test_single_file_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", None, "two", ""], "id": [1, 2, 3, 4]}),
                   tmp_path / "d.parquet")
    assert list(resolve_source(str(tmp_path / "d.parquet")).iter_texts()) == ["one", "two"]
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"text": "y", "meta": 1}\n', "utf-8")
    assert list(resolve_source(str(tmp_path / "a.jsonl")).iter_texts()) == ["x", "y"]


def test_large_text_file_is_cut_at_line_ends(tmp_path, monkeypatch):
    from homestar.data import files

    monkeypatch.setattr(files, "PIECE_BYTES", 64)
    text = "".join(f"line {i} é\n" for i in range(40))
    (tmp_path / "big.txt").write_text(text, "utf-8")
    pieces = list(resolve_source(str(tmp_path / "big.txt")).iter_texts())
    assert len(pieces) > 3 and "".join(pieces) == text
    assert all(p.endswith("\n") for p in pieces)


def test_default_corpus_is_embedded_and_works_without_datasets():
    code = (
        "import sys; sys.modules['datasets'] = None\n"  # importing datasets would now fail
        "from homestar.data import resolve_source\n"
        "a = resolve_source(None); b = resolve_source('default')\n"
        "assert a.kind == 'embedded' and a.fingerprint == b.fingerprint, a\n"
        "assert 8e6 <= sum(len(t.encode()) for t in a.iter_texts()) <= 12e6\n"
        "print(a.description)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Python standard library source (")


# -- bad data -----------------------------------------------------------------------------------

def _bad(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("name, content, message", [
    ("bin.txt", b"text\x00\x01more", "binary file (NUL byte at offset 4)"),
    ("latin.md", "caf\xe9\n".encode("latin-1"), "not valid UTF-8 text (bad byte at offset 3)"),
    ("bad.jsonl", b"{not json}\n", "bad.jsonl:1: not valid JSON"),
    ("notext.jsonl", b'{"body": "x"}\n', 'notext.jsonl:1: the record has no "text" field'),
    ("num.jsonl", b'{"text": 3}\n', '"text" is a int, not a string'),
    ("data.csv", b"a,b\n", "unsupported file type '.csv'"),
    ("empty.txt", b"", "every data file is empty"),
])
def test_bad_files_are_refused_when_resolved(tmp_path, name, content, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_source(_bad(tmp_path, name, content))


def test_problems_past_the_first_lines_are_refused_before_training(tmp_path, cache):
    jsonl = _bad(tmp_path, "late.jsonl", b'{"text": "ok"}\n' * 5 + b'{"text": broken\n')
    with pytest.raises(DataError, match=r"late.jsonl:6: not valid JSON"):
        load_tokenizer(resolve_source(jsonl), 300, cache_dir=cache)
    binary = _bad(tmp_path, "late.txt", b"a" * 20_000 + b"\x00")
    with pytest.raises(DataError, match="NUL byte at offset 20000"):
        load_tokenizer(resolve_source(binary), 300, cache_dir=cache)
    assert not (cache / "tokenizers").exists() or not any((cache / "tokenizers").glob("*.json"))


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_source("corpus/train.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt, .md, .py, .jsonl, .parquet files"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataError, match="every data file is empty"):
        resolve_source(str(tmp_path / "blank"))


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r'no "text" column \(columns: body\)'):
        resolve_source(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match="not a readable parquet file"):
        resolve_source(_bad(tmp_path, "junk.parquet", b"not parquet at all"))


def test_too_little_text_says_how_much_is_needed():
    with pytest.raises(DataError, match=r"has 50 tokens, but one window of seq_len 64 needs 65"):
        TokenStream(np.arange(50, dtype=np.uint16), seq_len=64, micro_batch=2, seed=0)
    TokenStream(np.arange(65, dtype=np.uint16), seq_len=64, micro_batch=2, seed=0).next_batch()


# -- hub datasets (a stand-in module: tests never touch the network) ------------------------------

class FakeDataset:
    def __init__(self, rows, columns=("text",)):
        self.rows, self.column_names, self._fingerprint = rows, list(columns), "fp123"

    def __len__(self):
        return len(self.rows)

    def select_columns(self, cols):
        return self

    def iter(self, batch_size):
        for i in range(0, len(self.rows), batch_size):
            yield {"text": self.rows[i:i + batch_size]}


def fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_hub_dataset_offline_is_a_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)\nmore")
    fake_datasets(monkeypatch, offline)
    with pytest.raises(DataError, match=r"someone/corpus: no such file or folder, and loading it as "
                                        r"a Hugging Face dataset failed \(Couldn't reach"):
        resolve_source("someone/corpus")


def test_hub_dataset_texts_and_columns(monkeypatch):
    calls = []

    def load(name, config, split):
        calls.append((name, config, split))
        return FakeDataset(["a", None, "b"] * 700)
    fake_datasets(monkeypatch, load)
    src = resolve_source("someone/corpus:en")
    assert calls == [("someone/corpus", "en", "train")]
    assert src.kind == "hub" and "2,100 documents" in src.description
    assert list(src.iter_texts()) == ["a", "b"] * 700
    fake_datasets(monkeypatch, lambda *a, **k: FakeDataset([], columns=("content",)))
    with pytest.raises(DataError, match='no "text" column'):
        resolve_source("someone/other")


# -- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_is_trained_cached_and_round_trips(corpus, cache, monkeypatch):
    src = resolve_source(str(corpus))
    tok = load_tokenizer(src, 320, cache_dir=cache)
    assert tok.token_to_id(EOT) == 0 and tok.get_vocab_size() == 320
    text = "naïve café 東京 → def f(x):\n\treturn x  \n"
    assert tok.decode(tok.encode(text).ids) == text
    cached = cache / "tokenizers" / f"{src.fingerprint}-320.json"
    assert cached.is_file()

    def no_training(*a, **k):
        raise AssertionError("trained again")
    monkeypatch.setattr(tokenizer_mod, "train_bpe", no_training)
    assert tokenizer_hash(load_tokenizer(src, 320, cache_dir=cache)) == tokenizer_hash(tok)
    monkeypatch.undo()
    cached.write_text("{ damaged")
    again = load_tokenizer(src, 320, cache_dir=cache)  # a damaged entry is rebuilt, identically
    assert tokenizer_hash(again) == tokenizer_hash(tok)


def test_tiny_data_gives_a_smaller_tokenizer(cache):
    tok = load_tokenizer(list_source(["ab ab ab"]), 5000, cache_dir=cache)
    assert 257 < tok.get_vocab_size() < 5000
    with pytest.raises(ConfigError, match="at least 257"):
        load_tokenizer(list_source(["ab"]), 256, cache_dir=cache)
    with pytest.raises(DataError, match="no text to train on"):
        load_tokenizer(list_source([], fingerprint="e" * 64), 300, cache_dir=cache)


def test_given_tokenizer_file(corpus, cache, tmp_path):
    src = resolve_source(str(corpus))
    tok = load_tokenizer(src, 300, cache_dir=cache)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    given = load_tokenizer(src, 300, cache_dir=tmp_path / "other", tokenizer_path=path)
    assert tokenizer_hash(given) == tokenizer_hash(tok)
    with pytest.raises(ConfigError, match="more than the model's vocab size 280"):
        load_tokenizer(src, 280, cache_dir=cache, tokenizer_path=path)
    path.write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(src, 300, cache_dir=cache, tokenizer_path=path)
    with pytest.raises(DataError, match="no such tokenizer file"):
        load_tokenizer(src, 300, cache_dir=cache, tokenizer_path=tmp_path / "missing.json")
    from tokenizers import Tokenizer, models
    Tokenizer(models.BPE()).save(str(path))
    with pytest.raises(DataError, match="no end-of-text token"):
        load_tokenizer(src, 300, cache_dir=cache, tokenizer_path=path)


# -- token files --------------------------------------------------------------------------------

def test_tokens_are_split_by_document_and_memmapped(corpus, cache):
    src = resolve_source(str(corpus))
    tok = load_tokenizer(src, 300, cache_dir=cache)
    data = load_tokens(src, tok, cache_dir=cache, val_fraction=0.1)
    docs = [[0, *tok.encode(t).ids] for t in src.iter_texts()]
    total = sum(len(d) for d in docs)
    assert data.eot == 0 and data.train.dtype == np.uint16
    assert len(data.train) + len(data.val) == total
    assert len(data.val) >= 0.1 * total and data.train[0] == 0 and data.val[0] == 0
    # every stored sequence is made of whole documents (this corpus needs no tail top-up)
    starts = lambda a: {tuple(a[i + 1:i + 6]) for i in np.flatnonzero(np.asarray(a) == 0)}  # noqa: E731
    doc_heads = {tuple(d[1:6]) for d in docs}
    assert starts(data.train) | starts(data.val) == doc_heads
    assert not starts(data.train) & starts(data.val)

    cached = load_tokens(list_source([], fingerprint=src.fingerprint), tok, cache_dir=cache,
                         val_fraction=0.1)  # same key, no text: must come from the cache
    assert isinstance(cached.train, np.memmap)
    assert np.array_equal(cached.train, data.train) and np.array_equal(cached.val, data.val)
    assert [p.name for p in (cache / "tokens").iterdir()] == [
        f"{src.fingerprint}-{tokenizer_hash(tok)[:16]}"]


def test_few_large_documents_still_get_a_validation_tail(cache):
    texts = [prose(3000, 1), prose(3000, 2)]
    tok = load_tokenizer(list_source(texts), 300, cache_dir=cache)
    data = load_tokens(list_source(texts), tok, cache_dir=cache)
    n = len(data.train) + len(data.val)
    assert len(data.val) >= tokens_mod.min_val_tokens(n) > 0


def test_damaged_or_interrupted_cache_is_rebuilt(corpus, cache):
    src = resolve_source(str(corpus))
    tok = load_tokenizer(src, 300, cache_dir=cache)
    good = np.array(load_tokens(src, tok, cache_dir=cache).train)  # a copy: the file gets cut below
    entry = next((cache / "tokens").iterdir())
    with open(entry / "train.bin", "r+b") as f:
        f.truncate(10)
    rebuilt = load_tokens(src, tok, cache_dir=cache)
    assert np.array_equal(rebuilt.train, good)

    def dies_midway():
        yield "some text " * 50
        raise DataError("disk went away")
    other = Source(spec="mem", kind="files", description="", fingerprint="d" * 64, read=dies_midway)
    with pytest.raises(DataError, match="disk went away"):
        load_tokens(other, tok, cache_dir=cache)
    assert sorted(p.name for p in (cache / "tokens").iterdir()) == [entry.name]  # no leftovers


def test_wide_vocab_uses_uint32():
    assert tokens_mod._dtype_for(types.SimpleNamespace(get_vocab_size=lambda: 65536)) == np.uint16
    assert tokens_mod._dtype_for(types.SimpleNamespace(get_vocab_size=lambda: 65537)) == np.uint32


# -- stream ---------------------------------------------------------------------------------------

TOKENS = np.arange(5000, dtype=np.uint16)


def test_batches_are_shifted_windows():
    x, y = TokenStream(TOKENS, seq_len=16, micro_batch=4, seed=3).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # windows of arange: consecutive tokens
    assert torch.equal(x[:, 1:], x[:, :-1] + 1) and int(y.max()) < len(TOKENS)


def test_resume_is_exact_and_seed_is_checked():
    a = TokenStream(TOKENS, seq_len=8, micro_batch=2, seed=7)
    first = [a.next_batch()[0] for _ in range(6)]
    b = TokenStream(TOKENS, seq_len=8, micro_batch=2, seed=7)
    for _ in range(3):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))  # checkpoints store it as JSON
    c = TokenStream(TOKENS, seq_len=8, micro_batch=2, seed=7)
    c.load_state_dict(state)
    assert all(torch.equal(c.next_batch()[0], first[k]) for k in range(3, 6))
    assert not torch.equal(first[0], first[1])
    with pytest.raises(CheckpointError, match="seed 7"):
        TokenStream(TOKENS, seq_len=8, micro_batch=2, seed=8).load_state_dict(state)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**40), k=st.integers(0, 1000), world=st.integers(1, 8), data=st.data())
def test_rank_batches_are_draws_of_one_global_sequence(seed, k, world, data):
    rank = data.draw(st.integers(0, world - 1))
    ranked = TokenStream(TOKENS, seq_len=8, micro_batch=3, seed=seed, rank=rank, world=world)
    single = TokenStream(TOKENS, seq_len=8, micro_batch=3, seed=seed)
    assert torch.equal(ranked.batch_at(k)[0], single.batch_at(k * world + rank)[0])


def test_resume_with_another_world_size_continues_after_consumed_draws():
    saved = TokenStream(TOKENS, seq_len=8, micro_batch=2, seed=1, rank=0, world=2)
    for _ in range(5):
        saved.next_batch()  # draws 0..9 of the world have been used
    resumed = TokenStream(TOKENS, seq_len=8, micro_batch=2, seed=1, rank=1, world=4)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.batches == 3  # next draw of rank 1 is 3*4+1 = 13 >= 10


def test_bad_stream_config():
    with pytest.raises(ConfigError):
        TokenStream(TOKENS, seq_len=0, micro_batch=1, seed=0)
    with pytest.raises(ConfigError):
        TokenStream(TOKENS, seq_len=8, micro_batch=1, seed=0, rank=2, world=2)
