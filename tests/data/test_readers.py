"""Reading dataset files: the spec's three formats, and errors that name the file and the place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt_service.data.readers import DatasetError, guess_format, read_records
from tests.conftest import write_json, write_jsonl

RECORDS = [{"text": "用户：你好\n助手：你好！"}, {"text": "Hello"}, {"text": "第三条 sample"}]
BOM = b"\xef\xbb\xbf"


def read_error(path: Path, dataset_format: str | None = None) -> str:
    """The message of the DatasetError that reading `path` raises."""
    with pytest.raises(DatasetError) as info:
        read_records(path, dataset_format)
    return str(info.value)


def txt_bytes(records: list[dict], newline: str = "\n") -> bytes:
    return "".join(r["text"].replace("\n", " ") + newline for r in records).encode("utf-8")


def txt_records(records: list[dict]) -> list[dict]:
    return [{"text": r["text"].replace("\n", " ")} for r in records]


# The spec's formats


def test_json_is_a_list_of_text_objects(tmp_path: Path) -> None:
    assert read_records(write_json(tmp_path / "train.json", RECORDS)) == RECORDS


def test_jsonl_is_one_object_a_line_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS).replace("\n", "\n\n", 1) + "\n")
    assert read_records(path) == RECORDS


def test_txt_is_one_sample_a_line_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_bytes(b"\n" + txt_bytes(RECORDS) + b"   \n\n")
    assert read_records(path) == txt_records(RECORDS)


@pytest.mark.parametrize(("name", "expected"), [
    ("a.json", "json"), ("a.jsonl", "jsonl"), ("a.txt", "txt"), ("A.JSONL", "jsonl"), ("dir.v2/a.TXT", "txt"),
])
def test_the_format_is_guessed_from_the_extension(name: str, expected: str) -> None:
    assert guess_format(name, None) == expected


def test_a_named_format_wins_over_the_extension(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.data", RECORDS)
    assert read_records(path, "jsonl") == RECORDS
    assert read_records(path, "txt") == [{"text": line} for line in path.read_text().splitlines()]


def test_an_unknown_extension_without_a_format_asks_for_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.csv", RECORDS)
    message = read_error(path)
    assert "train.csv" in message and "'.csv'" in message and "dataset_format" in message


def test_an_unknown_format_name_is_refused(tmp_path: Path) -> None:
    message = read_error(write_json(tmp_path / "train.json", RECORDS), "parquet")
    assert "'parquet'" in message and "json, jsonl or txt" in message


# BOM and CRLF


@pytest.mark.parametrize("kind", ["json", "jsonl", "txt"])
@pytest.mark.parametrize(("bom", "newline"), [(True, "\n"), (False, "\r\n"), (True, "\r\n")])
def test_a_bom_and_crlf_line_ends_are_accepted(tmp_path: Path, kind: str, bom: bool, newline: str) -> None:
    if kind == "json":
        body = json.dumps(RECORDS, ensure_ascii=False, indent=1).replace("\n", newline).encode("utf-8")
        expected = RECORDS
    elif kind == "jsonl":
        body = "".join(json.dumps(r, ensure_ascii=False) + newline for r in RECORDS).encode("utf-8")
        expected = RECORDS
    else:
        body = txt_bytes(RECORDS, newline)
        expected = txt_records(RECORDS)
    path = tmp_path / f"train.{kind}"
    path.write_bytes((BOM if bom else b"") + body)
    records = read_records(path)
    assert records == expected
    assert not any("\r" in r["text"] or "\ufeff" in r["text"] for r in records)


# Errors that name the file and the place


def test_malformed_jsonl_names_the_file_and_the_line(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"sample {i}"}) for i in range(1, 17)] + ['{"text": "seventeen"', '{"text": "ok"}']
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    message = read_error(path)
    assert str(path) in message and "malformed JSON at line 17" in message


def test_malformed_jsonl_counts_blank_lines_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(BOM + b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n{"text": b}\r\n')
    assert "malformed JSON at line 4" in read_error(path)


def test_malformed_json_names_the_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    message = read_error(path)
    assert str(path) in message and "malformed JSON at line 3, column" in message


@pytest.mark.parametrize(("name", "content"), [
    ("empty.json", b"[]"), ("empty.json", b""), ("empty.json", BOM + b" \r\n"),
    ("empty.jsonl", b""), ("empty.jsonl", b"\n\r\n  \n"), ("empty.txt", b""), ("empty.txt", BOM + b"\n \n"),
])
def test_an_empty_dataset_is_an_error_naming_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    message = read_error(path)
    assert str(path) in message and "empty" in message and "malformed" not in message


@pytest.mark.parametrize("kind", ["json", "jsonl", "txt"])
def test_bytes_that_are_not_utf8_are_reported_with_their_offset(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"train.{kind}"
    head = b'[{"text": "a"},\n {"text": "' if kind == "json" else b'{"text": "a"}\n{"text": "'
    path.write_bytes(head + b"caf\xe9" + b'"}' + (b"]" if kind == "json" else b"\n"))
    message = read_error(path)
    assert str(path) in message and "not UTF-8" in message
    assert f"byte offset {len(head) + 3} (line 2)" in message


def test_the_offset_of_a_bad_byte_counts_the_bom(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_bytes(BOM + b"fine\r\nbad \xff here\r\n")
    offset = path.read_bytes().index(b"\xff")
    assert offset == 3 + len(b"fine\r\nbad ")
    assert f"byte offset {offset} (line 2)" in read_error(path)


def test_a_json_file_must_hold_a_list(tmp_path: Path) -> None:
    path = write_json(tmp_path / "train.json", {"data": RECORDS})
    message = read_error(path)
    assert str(path) in message and "list of objects" in message and "dict" in message


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_a_record_that_is_not_an_object_is_named_by_its_number(tmp_path: Path, kind: str) -> None:
    records = [RECORDS[0], RECORDS[1], ["not", "an", "object"]]
    path = write_json(tmp_path / "train.json", records) if kind == "json" else write_jsonl(
        tmp_path / "train.jsonl", records)
    message = read_error(path)
    assert str(path) in message and "record 3 is list" in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "train.jsonl"
    message = read_error(path)
    assert str(path) in message and "no such file" in message


def test_a_folder_is_not_a_dataset_file(tmp_path: Path) -> None:
    folder = tmp_path / "data.json"
    folder.mkdir()
    assert "no such file" in read_error(folder)
