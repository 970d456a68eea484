"""Token files: a corpus encoded once, split into train/validation, memory-mapped afterwards.

Layout: cache_dir/tokens/<fingerprint>-<tokenizer_hash[:16]>/{train.bin, val.bin, meta.json}.
Each document is written as <|endoftext|> followed by its tokens, so every document starts
after a separator (the same token begins a sample). Ids are uint16 when the tokenizer has at
most 65,536 tokens, else uint32. The entry is built in a temporary folder and renamed into place,
so a kill mid-build leaves no half entry; an entry that fails to open is rebuilt.

Split by document, deterministic and streaming: a document goes to validation when validation
holds less than `val_fraction` of the tokens so far, which spreads it across the corpus. When
that leaves validation short (few, large documents), the tail of the training tokens is moved
over so validation holds at least `min_val_tokens(n)`. Knows nothing of models or training.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from homestar.data.cache import commit_dir, temp_dir_beside
from homestar.data.corpus import Source
from homestar.data.tokenizer import eot_id, tokenizer_hash
from homestar.errors import ConfigError, DataError

FORMAT_VERSION = 1
BATCH_CHARS = 1 << 20  # documents handed to the Rust encoder per call (it splits them over cores)
MIN_VAL_TOKENS = 16_384


@dataclass(kw_only=True, slots=True)
class TokenData:
    """Token ids of one corpus under one tokenizer (read-only memory maps)."""

    train: np.ndarray
    """1-D training tokens."""
    val: np.ndarray
    """1-D validation tokens (disjoint documents from train)."""
    eot: int
    """The end-of-text id that precedes every document."""


def min_val_tokens(n_tokens: int) -> int:
    """Validation floor: MIN_VAL_TOKENS (several windows of usual lengths), at most a tenth."""
    return min(MIN_VAL_TOKENS, n_tokens // 10)


def load_tokens(source: Source, tok: Tokenizer, *, cache_dir: Path,
                val_fraction: float = 0.01) -> TokenData:
    """Memory-map the cached tokens of (source, tok), encoding the corpus first if needed.

    Cost when cached: opening three files (milliseconds). When not: one pass over the corpus;
    ~3 s per 10 MB of text on 2 cores.
    """
    if not 0.0 < val_fraction < 0.5:
        raise ConfigError(f"validation fraction {val_fraction} must be between 0 and 0.5")
    entry = Path(cache_dir) / "tokens" / f"{source.fingerprint}-{tokenizer_hash(tok)[:16]}"
    data = _open(entry, val_fraction)
    if data is None:
        _build(source, tok, entry, val_fraction)
        data = _open(entry, val_fraction)
        if data is None:
            raise DataError(f"{entry}: the token cache was written but cannot be read back")
    return data


def _dtype_for(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if tok.get_vocab_size() <= 1 << 16 else np.dtype(np.uint32)


def _open(entry: Path, val_fraction: float) -> TokenData | None:
    """The entry's memory maps, or None when it is absent, stale or damaged."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta["version"] != FORMAT_VERSION or meta["val_fraction"] != val_fraction:
            return None
        dtype = np.dtype(meta["dtype"])
        train = _map(entry / "train.bin", dtype, meta["train_tokens"])
        val = _map(entry / "val.bin", dtype, meta["val_tokens"])
        return TokenData(train=train, val=val, eot=int(meta["eot"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _map(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if path.stat().st_size != n * dtype.itemsize:
        raise ValueError(f"{path} has the wrong size")
    if n == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))  # no read until pages are touched


def _build(source: Source, tok: Tokenizer, entry: Path, val_fraction: float) -> None:
    tmp = temp_dir_beside(entry)
    try:
        eot, dtype = eot_id(tok), _dtype_for(tok)
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            n_train, n_val, n_docs = _encode_split(source, tok, eot, dtype, ftrain, fval,
                                                   val_fraction)
        if n_docs == 0:
            raise DataError(f"{source.spec}: no text to train on (every document is empty)")
        n_train, n_val = _top_up_val(tmp, dtype, n_train, n_val, val_fraction)
        meta = {
            "version": FORMAT_VERSION, "dtype": dtype.name, "eot": eot,
            "train_tokens": n_train, "val_tokens": n_val, "documents": n_docs,
            "val_fraction": val_fraction, "fingerprint": source.fingerprint,
            "tokenizer_hash": tokenizer_hash(tok), "source": source.description,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _fsync_files(tmp)
        commit_dir(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once committed (tmp was renamed away)


def _encode_split(source, tok, eot, dtype, ftrain, fval, val_fraction) -> tuple[int, int, int]:
    """Encode all documents in batches and stream each one to train or val; returns counts."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (0.20+)
    n_train = n_val = n_docs = 0
    for batch in _batches(source.iter_texts()):
        for enc in encode(batch, add_special_tokens=False):
            body = enc.ids  # each .ids access builds a new Python list: read it once
            ids = np.empty(len(body) + 1, dtype=dtype)  # cost: one small array per document
            ids[0] = eot
            ids[1:] = body
            if n_val < val_fraction * (n_train + n_val):
                fval.write(ids.tobytes())
                n_val += len(ids)
            else:
                ftrain.write(ids.tobytes())
                n_train += len(ids)
            n_docs += 1
    return n_train, n_val, n_docs


def _batches(texts):
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _top_up_val(tmp: Path, dtype: np.dtype, n_train: int, n_val: int,
                val_fraction: float) -> tuple[int, int]:
    """Move the tail of train.bin to the end of val.bin until val reaches its floor.

    Cost: one read + write of the moved tail (at most MIN_VAL_TOKENS or val_fraction of data).
    """
    n = n_train + n_val
    want = max(math.ceil(val_fraction * n), min_val_tokens(n))
    move = min(max(0, want - n_val), max(0, n_train - 1))
    if move == 0:
        return n_train, n_val
    keep_bytes = (n_train - move) * dtype.itemsize
    with open(tmp / "train.bin", "rb+") as ftrain, open(tmp / "val.bin", "ab") as fval:
        ftrain.seek(keep_bytes)
        fval.write(ftrain.read())
        ftrain.truncate(keep_bytes)
    return n_train - move, n_val + move


def _fsync_files(folder: Path) -> None:
    """Flush the entry's files to disk before it is renamed into place (cost: disk flushes)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
