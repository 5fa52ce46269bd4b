"""Plain-text sources for calibration: a text file, a column of a .tsv/.jsonl, an HF dataset.

Every reader returns a `TextSource` with the text, a human-readable name and the sha256 of
what was read, so a report can say exactly which data calibrated a model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from prunelab.errors import DataError
from prunelab.io import file_sha256
from prunelab.paths import shared_data_dir

TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md"}
TABLE_SUFFIXES = {".tsv", ".jsonl", ".json", ".csv"}


@dataclass
class TextSource:
    """Text read from one source. `sha256` is of the file bytes (files) or of the text (datasets)."""

    name: str
    kind: str  # "file", "tsv", "jsonl", "hf", "mrpc"
    texts: list[str]
    sha256: str

    @property
    def text(self) -> str:
        return "\n".join(self.texts)

    @property
    def n_chars(self) -> int:
        return sum(len(t) for t in self.texts) + max(0, len(self.texts) - 1)




def _nonempty(texts: list[str], where: str) -> list[str]:
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"{where} has no text: pass a file with text in it")
    return texts


def read_text_file(path: str | Path) -> TextSource:
    """A UTF-8 text file, one document per non-empty line."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason}): convert it or pass a .tsv/.jsonl") from exc
    return TextSource(str(path), "file", _nonempty(raw.splitlines(), str(path)), file_sha256(path))


def read_tsv_column(path: str | Path, columns: str | list[str]) -> TextSource:
    """Cells of one or more columns of a tab-separated file with a header (GLUE style: BOM, raw quotes)."""
    path = Path(path)
    wanted = [columns] if isinstance(columns, str) else list(columns)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    delimiter = "," if path.suffix == ".csv" else "\t"
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path} is empty: pass a file with a header row and text")
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{path} has no column '{missing[0]}': choose --calib-column from {', '.join(header)}")
        idx = [header.index(c) for c in wanted]
        texts = []
        for row in reader:
            for i in idx:
                if i < len(row):
                    texts.append(row[i])
    name = f"{path}:{'+'.join(wanted)}"
    return TextSource(name, "tsv", _nonempty(texts, name), file_sha256(path))


def read_jsonl_column(path: str | Path, column: str) -> TextSource:
    """The `column` field of every JSON object in a .jsonl file (or a .json list of objects)."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects")
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON lines (line {exc.lineno}): fix the file") from exc
    texts = []
    for row in rows:
        if not isinstance(row, dict) or column not in row:
            keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}: a row has no field '{column}' (has: {keys}); pass --calib-column")
        texts.append(str(row[column]))
    name = f"{path}:{column}"
    return TextSource(name, "jsonl", _nonempty(texts, name), file_sha256(path))


def mrpc_sentences(path: str | Path | None = None) -> TextSource:
    """The offline default calibration text: GLUE MRPC training sentences (#1 and #2), de-duplicated.

    Newswire English with no overlap with the WikiText-2 test set used for perplexity.
    """
    path = Path(path) if path else shared_data_dir() / "glue-mrpc" / "train.tsv"
    if not path.is_file():
        raise DataError(
            f"default calibration data {path} not found: put ../shared/data beside the repo, set "
            "PRUNELAB_DATA, or pass --calib FILE"
        )
    src = read_tsv_column(path, ["#1 String", "#2 String"])
    texts = list(dict.fromkeys(src.texts))
    return TextSource(f"glue-mrpc/train.tsv (#1 String + #2 String, {len(texts)} sentences)", "mrpc", texts,
                      src.sha256)


def read_hf_dataset(name: str, column: str | None = None, *, max_chars: int = 20_000_000) -> TextSource:
    """Text from a Hugging Face dataset, `NAME[:CONFIG[:SPLIT]]` (default split train, column text).

    Streams rows until `max_chars` characters are read, so large corpora (C4) cost only what
    calibration needs. Offline, this fails with a DataError that says to pass a local file.
    """
    parts = name.removeprefix("hf:").split(":")
    ds_name, ds_config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (
        parts[2] if len(parts) > 2 else "train")
    column = column or "text"
    try:
        import datasets

        ds = datasets.load_dataset(ds_name, ds_config, split=split, streaming=True)
        texts: list[str] = []
        total = 0
        for row in ds:
            if column not in row:
                raise DataError(f"dataset {ds_name} has no column '{column}' (has: {', '.join(row)}); "
                                "pass --calib-column")
            t = str(row[column])
            texts.append(t)
            total += len(t)
            if total >= max_chars:
                break
    except DataError:
        raise
    except Exception as exc:  # network, missing dataset, bad config: all one line for the user
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(
            f"cannot load Hugging Face dataset '{ds_name}' ({type(exc).__name__}: {reason}); if you are offline, "
            "pass a local .txt/.tsv/.jsonl file with --calib"
        ) from exc
    texts = _nonempty(texts, f"dataset {name}")
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    return TextSource(f"hf:{ds_name}" + (f":{ds_config}" if ds_config else "") + f":{split}:{column}", "hf",
                      texts, digest)


def _looks_like_path(spec: str) -> bool:
    p = Path(spec)
    return (
        p.exists() or spec.startswith((".", "/", "~")) or p.suffix.lower() in TEXT_SUFFIXES | TABLE_SUFFIXES
        or spec.count("/") > 1
    )


def read_text_source(spec: str | None, column: str | None = None) -> TextSource:
    """Resolve `--calib`: None → MRPC default; a path → text/.tsv/.jsonl; otherwise an HF dataset name."""
    if spec is None or spec in ("", "mrpc", "default"):
        return mrpc_sentences()
    if spec.startswith("hf:") or not _looks_like_path(spec):
        return read_hf_dataset(spec, column)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"calibration file {path} not found: pass an existing text/.tsv/.jsonl file")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        if not column:
            with open(path, encoding="utf-8-sig") as fh:
                header = fh.readline().rstrip("\n").split("\t" if suffix == ".tsv" else ",")
            raise DataError(f"{path} is a table: pass --calib-column, one of {', '.join(header)}")
        return read_tsv_column(path, column)
    if suffix in (".jsonl", ".json"):
        return read_jsonl_column(path, column or "text")
    return read_text_file(path)
