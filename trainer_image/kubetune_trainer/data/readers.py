"""Reading raw records from JSONL, JSON (array or object holding a list) and Parquet files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
LIST_KEYS = ("data", "examples", "train", "rows", "records", "items")


def file_kind(path: Path) -> str:
    """`jsonl`, `json` or `parquet`, from the file suffix."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise DataError(f"unsupported dataset file type {suffix or '(none)'!r}; use .jsonl, .json or .parquet",
                    path=str(path))


def read_records(path: str | Path) -> Iterator[tuple[int, object]]:
    """Yield (location, record) pairs; location is the line number (JSONL, JSON) or the 1-based row (Parquet)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("dataset file not found", path=str(path))
    kind = file_kind(path)
    if kind == "jsonl":
        yield from _read_jsonl(path)
    elif kind == "json":
        yield from _read_json(path)
    else:
        yield from _read_parquet(path)


def _read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    # Binary lines decoded one by one: a text-mode reader decodes whole buffers, so an invalid byte
    # would be reported at the line being read when the buffer was filled, not at its own line.
    with path.open("rb") as handle:
        for lineno, raw_bytes in enumerate(handle, start=1):
            try:
                raw = raw_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1} of the line)",
                                path=str(path), line=lineno) from exc
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=str(path), line=lineno) from exc


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_json(path: Path) -> Iterator[tuple[int, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=str(path)) from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=str(path), line=exc.lineno) from exc
    if isinstance(document, dict):
        keys = [k for k in LIST_KEYS if isinstance(document.get(k), list)]
        if not keys:
            keys = [k for k, v in document.items() if isinstance(v, list)]
        if len(keys) != 1:
            raise DataError("a JSON object dataset must hold exactly one list of examples "
                            f"(e.g. under 'data'); found list keys {sorted(keys)}", path=str(path), line=1)
        records = document[keys[0]]
        start = text.find(json.dumps(keys[0]))
        start = text.find("[", start) if start >= 0 else -1
    elif isinstance(document, list):
        records = document
        start = text.find("[")
    else:
        raise DataError(f"a JSON dataset must be an array of examples, not {type(document).__name__}",
                        path=str(path), line=1)
    yield from zip(_element_lines(text, start, len(records)), records)


def _element_lines(text: str, start: int, count: int) -> list[int]:
    """Line numbers where each element of the JSON array starting at `start` begins (best effort)."""
    decoder = json.JSONDecoder()
    lines: list[int] = []
    pos = start + 1 if start >= 0 else -1
    for _ in range(count):
        if pos < 0:
            break
        pos = _skip_ws(text, pos)
        lines.append(_line_of(text, pos))
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
    if len(lines) < count:  # fall back to element numbers for anything we could not place
        lines.extend(range(len(lines) + 1, count + 1))
    return lines


def _read_parquet(path: Path) -> Iterator[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read Parquet: {exc}", path=str(path)) from exc
    for index, row in enumerate(table.to_pylist(), start=1):
        yield index, row
