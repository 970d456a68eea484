"""Training data: corpus sources, the tokenizer, cached token files and the batch stream.

Nothing here knows of models, chunks or the UI. `datasets` is never imported at package import
(only to load a Hugging Face dataset), so the default corpus works on machines without it.
"""

from homestar.data.corpus import Source, resolve_source
from homestar.data.stream import TokenStream
from homestar.data.tokenizer import EOT, eot_id, load_tokenizer, tokenizer_hash, train_bpe
from homestar.data.tokens import TokenData, load_tokens

__all__ = [
    "EOT",
    "Source",
    "TokenData",
    "TokenStream",
    "eot_id",
    "load_tokenizer",
    "load_tokens",
    "resolve_source",
    "tokenizer_hash",
    "train_bpe",
]
