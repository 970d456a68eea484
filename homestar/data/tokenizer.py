"""Tokenizers: a byte-level BPE learned from the corpus (cached), or a given tokenizer.json.

The learned tokenizer is GPT-2 style: ByteLevel pre-tokenizer (GPT-2 split regex, no prefix
space) and decoder, so any UTF-8 text round-trips exactly. Its ids: 0 is "<|endoftext|>", 1..256
are the 256 byte symbols, then merges up to `vocab_size`. On a small corpus BPE can run out of
pairs to merge, so the tokenizer may hold fewer than `vocab_size` tokens; the model keeps its
configured vocab size (the unused rows are never targets). Knows nothing of token files or
training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from homestar.data.cache import atomic_write_text
from homestar.data.corpus import Source
from homestar.data.files import first_line
from homestar.errors import ConfigError, DataError

EOT = "<|endoftext|>"
EOT_ALIASES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
MIN_VOCAB = 257  # the end-of-text token + 256 byte symbols
TRAIN_TEXT_CAP = 256 << 20  # the BPE learns from at most the first ~256 M characters


def load_tokenizer(source: Source, vocab_size: int, *, cache_dir: Path,
                   tokenizer_path: Path | None = None) -> Tokenizer:
    """The given tokenizer file, else the cached BPE for (source, vocab_size), else train one.

    Cache: cache_dir/tokenizers/<fingerprint>-<vocab_size>.json, written atomically; an entry
    that fails to load is retrained. Cost of training: ~3 s for 10 MB of text on 2 cores.
    """
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"vocab size {vocab_size} is too small; a byte-level tokenizer needs "
                          f"at least {MIN_VOCAB}")
    if tokenizer_path is not None:
        tok = read_tokenizer_file(Path(tokenizer_path))
        if tok.get_vocab_size() > vocab_size:
            raise ConfigError(f"{tokenizer_path}: the tokenizer has {tok.get_vocab_size():,} "
                              f"tokens, more than the model's vocab size {vocab_size:,}")
        return tok
    path = Path(cache_dir) / "tokenizers" / f"{source.fingerprint}-{vocab_size}.json"
    cached = _load_cached(path)
    if cached is not None:
        return cached
    tok = train_bpe(source.iter_texts(), vocab_size, what=source.spec)
    atomic_write_text(path, tok.to_str())
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, *, what: str = "the data") -> Tokenizer:
    """Learn a byte-level BPE of at most `vocab_size` tokens from `texts`.

    Cost: the Rust trainer uses every core; memory grows with the number of distinct words.
    """
    counted = _Counted(_capped(texts, TRAIN_TEXT_CAP))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(counted, trainer)
    if counted.n == 0:
        raise DataError(f"{what}: no text to train on (every document is empty)")
    return tok


def read_tokenizer_file(path: Path) -> Tokenizer:
    """Load a `tokenizers` JSON file that has an end-of-text token, or raise DataError."""
    if not path.is_file():
        raise DataError(f"{path}: no such tokenizer file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse failure
        raise DataError(f"{path}: not a valid tokenizer.json ({first_line(e)})") from None
    eot_id(tok, where=str(path))
    return tok


def eot_id(tok: Tokenizer, *, where: str = "the tokenizer") -> int:
    """Id of the end-of-text token ("<|endoftext|>", or a common alias)."""
    for name in EOT_ALIASES:
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    raise DataError(f"{where}: no end-of-text token (expected one of {', '.join(EOT_ALIASES)})")


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the serialized tokenizer (stable across save/load). Cost: one serialization."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def _load_cached(path: Path) -> Tokenizer | None:
    if not path.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception:  # a damaged cache entry: the caller retrains and overwrites it
        return None
    return tok if tok.token_to_id(EOT) == 0 else None


def _capped(texts: Iterable[str], cap: int) -> Iterator[str]:
    """Texts until `cap` characters have been given (the last one whole)."""
    total = 0
    for text in texts:
        if total >= cap:
            return
        total += len(text)
        yield text


class _Counted:
    """Iterator wrapper that counts what passed through (to tell "no text" after training)."""

    def __init__(self, it: Iterator[str]):
        self._it, self.n = it, 0

    def __iter__(self) -> Iterator[str]:
        for text in self._it:
            self.n += 1
            yield text

