"""Where the training text comes from: the embedded default, local files, or a hub dataset.

`resolve_source(spec)` turns what the user typed into a `Source`: a one-line description for the
UI, a fingerprint that changes when the data changes (the key of every cache built from it), and
a way to iterate its documents in a fixed order. Missing, empty or unreadable data raises
`DataError` here or while iterating, both before training starts. Knows nothing of tokenizers,
token files or training; `datasets` is imported only for a hub dataset.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from homestar.data import embedded, files
from homestar.errors import DataError

FILES_FORMAT_VERSION = "files-v1"  # bump when document splitting rules change
CONTENT_HASH_LIMIT = 64 << 20  # hash contents up to this size; above it, names + sizes + mtimes


@dataclass(kw_only=True, slots=True, frozen=True)
class Source:
    """A resolved corpus. Cheap to keep around: texts are read only when iterated."""

    spec: str
    """What the user gave, normalised so it can be resolved again from anywhere: "default", an
    absolute path, or a dataset name."""
    kind: str
    """"embedded" | "files" | "hub"."""
    description: str
    """One line for the UI, e.g. "Python standard library source (594 files, 10.0 MB)"."""
    fingerprint: str
    """Hex digest of the content identity; changes when the data changes."""
    read: Callable[[], Iterable[str]] = field(repr=False, compare=False)
    """Produces the documents, in order (each call starts again from the first)."""

    def __post_init__(self) -> None:
        if self.kind not in ("embedded", "files", "hub"):
            raise ValueError(f"unknown source kind {self.kind!r}")

    def iter_texts(self) -> Iterator[str]:
        """Documents in a deterministic order; a bad file raises DataError as it is reached."""
        return iter(self.read())


def resolve_source(spec: str | None) -> Source:
    """"default"/None -> the embedded corpus; an existing path -> files; else a hub dataset."""
    if spec is None or spec.strip() in ("", "default"):
        return _embedded_source()
    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):  # e.g. a NUL byte or an over-long name
        raise DataError(f"{spec!r} is not a usable path") from None
    if exists:
        return _files_source(spec, path)
    if _looks_like_path(spec):
        raise DataError(f"{spec}: no such file or folder")
    return _hub_source(spec)


def human_bytes(n: int) -> str:
    """1_234_567 -> "1.2 MB" (decimal units, as disks are sold)."""
    if n < 1000:
        return f"{n} B"
    size = n / 1000
    for unit in ("KB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _embedded_source() -> Source:
    corpus = embedded.find_stdlib()
    return Source(
        spec="default",
        kind="embedded",
        description=f"Python standard library source ({len(corpus.files):,} files, "
                    f"{human_bytes(corpus.nbytes)})",
        fingerprint=embedded.fingerprint(corpus),
        read=lambda: embedded.read_texts(corpus),
    )


def _files_source(spec: str, path: Path) -> Source:
    """Local files; checked now as far as cheap (listing, each file's head), fully when read."""
    if not os.access(path, os.R_OK):
        raise DataError(f"{spec}: not readable (permission denied)")
    found = files.list_files(path)
    files.check_files(found, path)
    nbytes = sum(p.stat().st_size for p in found)
    kinds = ", ".join(sorted({p.suffix.lower() for p in found}))
    where = path.name if path.is_file() else f"{len(found):,} files in {path}"
    return Source(
        spec=str(path.resolve()),
        kind="files",
        description=f"{where} ({kinds}, {human_bytes(nbytes)})",
        fingerprint=_files_fingerprint(found, path, nbytes),
        read=lambda: files.read_documents(found),
    )


def _files_fingerprint(found: list[Path], root: Path, nbytes: int) -> str:
    """Content hash for data up to CONTENT_HASH_LIMIT (survives copies and touches);
    above it, relative names + sizes + mtimes so a big corpus is not read twice per start."""
    base = root if root.is_dir() else root.parent
    by_content = nbytes <= CONTENT_HASH_LIMIT
    h = hashlib.sha256(f"{FILES_FORMAT_VERSION}:{'content' if by_content else 'stat'}".encode())
    for p in found:
        h.update(p.relative_to(base).as_posix().encode() + b"\x00")
        if by_content:
            h.update(p.read_bytes())  # cost: reads the file once (at most 64 MB in all)
        else:
            st = p.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(b"\x00")
    return h.hexdigest()


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a hub name ("owner/name" or "name") is a missing path."""
    return (
        spec.startswith(("/", ".", "~"))
        or "\\" in spec
        or spec.count("/") > 1
        or Path(spec).suffix.lower() in files.SUPPORTED_SUFFIXES
    )


def _hub_source(spec: str) -> Source:
    """A Hugging Face dataset, "owner/name" or "owner/name:config"; its "train" split."""
    name, _, config = spec.partition(":")
    try:
        import datasets  # lazy: heavy, and absent on lean GPU machines
    except ImportError:
        raise DataError(f"{spec}: no such file or folder (and the datasets package, needed for a "
                        "Hugging Face dataset, is not installed)") from None
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # network, auth, missing dataset: all reach the user as one line
        raise DataError(f"{spec}: no such file or folder, and loading it as a Hugging Face "
                        f"dataset failed ({files.first_line(e)})") from None
    columns = list(ds.column_names)
    if "text" not in columns:
        raise DataError(f'{spec}: the dataset has no "text" column (columns: {", ".join(columns)})')
    ident = getattr(ds, "_fingerprint", None) or f"{len(ds)}"
    return Source(
        spec=spec,
        kind="hub",
        description=f"Hugging Face dataset {spec} ({len(ds):,} documents)",
        fingerprint=hashlib.sha256(f"hub-v1:{spec}:{ident}".encode()).hexdigest(),
        read=lambda: _hub_texts(ds, spec),
    )


def _hub_texts(ds, spec: str) -> Iterator[str]:
    for batch in ds.select_columns(["text"]).iter(batch_size=1024):
        for text in batch["text"]:
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f'{spec}: "text" holds {type(text).__name__} values, not strings')
            if text:
                yield text
