"""Read a dataset file into records, with errors that name the file and the place.

Formats are the spec's: JSON (`[{"text": ...}, ...]`), JSONL (one object a line) and TXT (one
sample a line). A UTF-8 BOM and CRLF line ends are accepted.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from gpt_service.config import DatasetFormat
from gpt_service.errors import UserError

EXTENSION_FORMATS: dict[str, DatasetFormat] = {".json": "json", ".jsonl": "jsonl", ".txt": "txt"}
# Far above any max_length; a longer record is a broken file (a missing line break), not a sample.
MAX_RECORD_CHARS = 1_000_000

Record = dict[str, Any]


class DatasetError(UserError):
    """A dataset that cannot be used; the message names the file and the place."""


def guess_format(path: str | Path, dataset_format: str | None) -> DatasetFormat:
    """The given format, or the one the file extension names."""
    if dataset_format:
        if dataset_format not in EXTENSION_FORMATS.values():
            raise DatasetError(f"unknown dataset_format {dataset_format!r}: use json, jsonl or txt")
        return dataset_format  # type: ignore[return-value]
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSION_FORMATS:
        raise DatasetError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            "name a dataset_format (json, jsonl or txt)"
        )
    return EXTENSION_FORMATS[suffix]


def dataset_file_format(path: str | Path, dataset_format: str | None) -> DatasetFormat:
    """The format of a dataset file that exists (else DatasetError), without reading it."""
    fmt = guess_format(path, dataset_format)
    if not Path(path).is_file():
        raise DatasetError(f"{path}: no such file")
    return fmt


def _decode(path: Path) -> str:
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start  # in the file, BOM included
        line = data[:offset].count(b"\n") + 1
        raise DatasetError(
            f"{path}: bytes that are not UTF-8 at byte offset {offset} (line {line}); "
            "save the file as UTF-8"
        ) from exc
    return text.replace("\r\n", "\n")


def _json_error(path: Path, exc: json.JSONDecodeError, line: int | None = None) -> DatasetError:
    where = f"line {line}" if line is not None else f"line {exc.lineno}, column {exc.colno}"
    return DatasetError(f"{path}: malformed JSON at {where}: {exc.msg}")


def read_records(path: str | Path, dataset_format: str | None = None) -> list[Record]:
    """All records of the file, each a dict. TXT lines become `{"text": line}`."""
    path = Path(path)
    fmt = dataset_file_format(path, dataset_format)
    text = _decode(path)
    if fmt in ("txt", "jsonl"):
        for number, line in enumerate(text.split("\n"), start=1):
            if len(line) > MAX_RECORD_CHARS:
                raise DatasetError(f"{path}: line {number} has {len(line):,} characters; a record may have at "
                                   f"most {MAX_RECORD_CHARS:,} (is a line break missing?)")
    if fmt == "txt":
        records: list[Any] = [{"text": line} for line in text.split("\n") if line.strip()]
    elif fmt == "jsonl":
        records = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise _json_error(path, exc, line=number) from exc
    elif not text.strip():
        records = []
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc) from exc
        if not isinstance(records, list):
            raise DatasetError(
                f"{path}: a JSON dataset must be a list of objects, found {type(records).__name__}"
            )
    if not records:
        raise DatasetError(f"{path}: the dataset is empty")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(
                f"{path}: record {index + 1} is {type(record).__name__}, expected an object"
            )
        if (size := _text_size(record)) > MAX_RECORD_CHARS:
            raise DatasetError(f"{path}: record {index + 1} holds {size:,} characters of text; a record may "
                               f"have at most {MAX_RECORD_CHARS:,}")
    return records


def _text_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_size(v) for v in value)
    return 0
