"""Local training text: listing, checking and reading .txt / .md / .py / .jsonl / .parquet files.

Every problem becomes a `DataError` that names the file (and line, for JSON Lines), so a user
learns what is wrong before any training starts. `check_files` is the cheap early look (listing
and the head of each file); `read_documents` checks everything as it streams. Knows nothing of
tokenizers, caches or training.

Documents: a .txt/.md/.py file is one document (a file over `PIECE_BYTES` is cut at line ends into
pieces of about that size, so a huge file never has to fit in memory at once); each JSON Lines
record and each parquet row is one document, its "text" field. Empty documents are skipped.
Parquet is read with pyarrow (the columnar library under `datasets`, imported only when needed).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path

from homestar.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".py")  # .py: source code is text, like the default corpus
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
PIECE_BYTES = 4 << 20
SNIFF_BYTES = 8192


def list_files(root: Path) -> list[Path]:
    """The supported files at `root` (a file, or a folder searched recursively), sorted by path.

    Hidden files and folders (names starting with ".") are skipped; so are other file types in a
    folder. A single file of an unsupported type is an error.
    """
    if root.is_file():
        if _suffix(root) not in SUPPORTED_SUFFIXES:
            raise DataError(f"{root}: unsupported file type '{root.suffix or '(none)'}'; "
                            f"homestar reads {', '.join(SUPPORTED_SUFFIXES)}")
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, n) for n in filenames
                     if not n.startswith(".") and _suffix(Path(n)) in SUPPORTED_SUFFIXES)
    if not found:
        raise DataError(f"{root}: no {', '.join(SUPPORTED_SUFFIXES)} files in this folder")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def check_files(files: list[Path], root: Path) -> None:
    """Early, cheap checks: some bytes to read, and the head of each file looks like its type."""
    if sum(p.stat().st_size for p in files) == 0:
        raise DataError(f"{root}: every data file is empty")
    for path in files:
        kind = _suffix(path)
        if kind in TEXT_SUFFIXES:
            with open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
            _check_text_bytes(head, path, offset=0, final=len(head) < SNIFF_BYTES)
        elif kind == ".jsonl":
            _check_first_record(path)
        else:
            _parquet_file(path)


def read_documents(files: list[Path]) -> Iterator[str]:
    """Every document of `files`, in order, fully checked as it is read."""
    for path in files:
        kind = _suffix(path)
        if kind in TEXT_SUFFIXES:
            yield from _text_pieces(path)
        elif kind == ".jsonl":
            yield from (text for _, text in _jsonl_records(path))
        else:
            yield from _parquet_texts(path)


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _check_text_bytes(data: bytes, path: Path, *, offset: int, final: bool) -> str:
    """Decode UTF-8 text or raise: NUL bytes mean binary, bad sequences mean another encoding."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: looks like a binary file (NUL byte at offset {offset + nul}); "
                        "homestar trains on UTF-8 text")
    decoder = codecs.getincrementaldecoder("utf-8-sig" if offset == 0 else "utf-8")("strict")
    try:
        return decoder.decode(data, final=final)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text (bad byte at offset {offset + e.start}); "
                        "convert it to UTF-8") from None


def _text_pieces(path: Path) -> Iterator[str]:
    """The file's text in pieces of about PIECE_BYTES cut after a newline (one piece if small).

    A newline byte never occurs inside a UTF-8 multi-byte sequence, so each piece decodes alone.
    Cost: one read of the file, one copy when a piece is carried over a block boundary.
    """
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(PIECE_BYTES)
            data = carry + block if carry else block
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut == 0:  # no line end yet: keep reading until one (or the end of the file)
                carry = data
                continue
            piece, carry = data[:cut], data[cut:]
            text = _check_text_bytes(piece, path, offset=offset, final=True)
            offset += len(piece)
            if text:
                yield text


def _jsonl_records(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each record with non-empty text; blank lines are skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            text = _record_text(raw, path, lineno)
            if text:
                yield lineno, text


def _record_text(raw: bytes, path: Path, lineno: int) -> str:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{where}: not valid UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f'{where}: the record has no "text" field; each line must look like '
                        '{"text": "..."}')
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f'{where}: "text" is a {type(text).__name__}, not a string')
    return text


def _check_first_record(path: Path) -> None:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                _record_text(raw, path, lineno)
                return


def _parquet_file(path: Path):
    """Open a parquet file and check it has a "text" column (reads only the footer)."""
    try:
        import pyarrow.parquet as pq  # lazy: installed with `datasets`, absent on lean machines
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install datasets)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses; report, never swallow
        raise DataError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(f'{path}: no "text" column (columns: {", ".join(pf.schema_arrow.names)})')
    return pf


def _parquet_texts(path: Path) -> Iterator[str]:
    pf = _parquet_file(path)
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f'{path}: "text" holds {type(text).__name__} values, not strings')
            if text:
                yield text


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
