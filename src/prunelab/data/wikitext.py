"""WikiText-2 (raw) test text for perplexity, and its token stream.

The standard protocol (SparseGPT, Wanda) joins the Hugging Face `wikitext-2-raw-v1` test rows
with "\\n\\n" and tokenizes the result once. The offline `wiki.test.raw` holds one HF row per
line (empty rows written as " "), so the rows are rebuilt exactly as its README describes; the
joined text then matches what `datasets` gives (sha256 696cca6b…).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import DataError, first_line
from prunelab.io import file_sha256
from prunelab.paths import shared_data_dir

HF_NAMES = {"wikitext", "wikitext-2-raw-v1", "wikitext/wikitext-2-raw-v1", "Salesforce/wikitext"}


@dataclass
class TextCorpus:
    """A text corpus as the benchmarks see it: the rows, where they came from, and a checksum."""

    rows: list[str]
    path: str  # file path, or "hf:<name>" for a hub dataset
    sha256: str  # of the file as stored (or of the joined text for a hub dataset)

    @property
    def text(self) -> str:
        return "\n\n".join(self.rows)

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def default_wikitext_path() -> Path:
    return shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw"


def rows_from_raw(path: str | Path) -> list[str]:
    """HF rows from a `wiki.test.raw`-style file: one row per line, whitespace-only lines are empty rows."""
    text = Path(path).read_text(encoding="utf-8")
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _load_hf(name: str) -> TextCorpus:
    try:
        from datasets import load_dataset

        ds = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:
        reason = first_line(exc)
        raise DataError(
            f"cannot load the HF dataset '{name}' ({reason}); offline, omit --data to use "
            f"{default_wikitext_path()}"
        ) from exc
    rows = list(ds["text"])
    corpus = TextCorpus(rows=rows, path=f"hf:{name}", sha256="")
    corpus.sha256 = corpus.text_sha256
    return corpus


def load_wikitext(data: str | None = None) -> TextCorpus:
    """The WikiText-2 raw test rows: `data` is a file path, an HF dataset name, or None (offline copy)."""
    if data is not None and data in HF_NAMES and not Path(data).exists():
        return _load_hf(data)
    path = Path(data) if data is not None else default_wikitext_path()
    if not path.is_file():
        raise DataError(
            f"text file not found: {path}; put ../shared/data beside the repo, set $PRUNELAB_DATA, "
            "or pass --data FILE"
        )
    rows = rows_from_raw(path)
    if not any(r.strip() for r in rows):
        raise DataError(f"dataset {path} is empty: pass a text file with at least one non-empty line")
    return TextCorpus(rows=rows, path=str(path), sha256=file_sha256(path))


_TOKEN_CACHE: dict[tuple[str, str, int], torch.Tensor] = {}


def _tokenizer_key(tokenizer: Any) -> str:
    """Identity of a tokenizer's behaviour: the hash of its serialized fast tokenizer when it has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
        except Exception:  # pragma: no cover - exotic tokenizers
            pass
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"


def token_stream(tokenizer: Any, corpus: TextCorpus, *, add_special_tokens: bool = True) -> torch.Tensor:
    """The corpus text tokenized once, as a 1-D LongTensor (cached per tokenizer and text).

    Tokenizing the whole joined text in one call is the protocol: windows are cut from this
    stream, so every model sharing a tokenizer sees exactly the same windows.
    """
    key = (_tokenizer_key(tokenizer), corpus.text_sha256, int(add_special_tokens))
    cached = _TOKEN_CACHE.get(key)
    if cached is not None:
        return cached
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than model max length" is expected here
    try:
        ids = tokenizer(corpus.text, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(verbosity)
    stream = torch.tensor(ids, dtype=torch.long)
    if stream.numel() == 0:
        raise DataError(f"dataset {corpus.path} tokenizes to zero tokens: pass a non-empty text file")
    if len(_TOKEN_CACHE) > 8:
        _TOKEN_CACHE.clear()
    _TOKEN_CACHE[key] = stream
    return stream
