"""LLaVA-style conversation JSON and JSON Lines source files, a few hundred records at a time."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import polars as pl

from .source_data import (
    ImageResolver,
    SourceDataError,
    SourceOptions,
    read_chunks,
)

_ANSWER_PREFIX = "Answer:"
JSON_READ_CHARS = 1 << 20  # characters read at a time from a JSON array


def json_records(file, name: str) -> Iterator[tuple[int, dict]]:
    """(index, record) of a JSON array or a JSON Lines file, read piece by piece (a 2 GB file is never held
    whole); an unparsable record names the file and its line or index."""
    text = io.TextIOWrapper(file, encoding="utf-8")
    head = text.read(1)
    while head and head.isspace():
        head = text.read(1)
    if head != "[":  # JSON Lines: one record per line
        for line_number, line in enumerate(_lines(head, text), start=1):
            if line.strip():
                try:
                    yield line_number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceDataError(f"{name}: line {line_number} is not JSON ({e.msg})") from e
        return
    decoder, buffer, index = json.JSONDecoder(), "", 0
    while True:
        buffer = buffer.lstrip().removeprefix(",").lstrip()
        if buffer.startswith("]"):
            return
        try:
            record, end = decoder.raw_decode(buffer)
        except json.JSONDecodeError as e:
            more = text.read(JSON_READ_CHARS)
            if not more:
                raise SourceDataError(f"{name}: record {index} of the JSON array is not JSON ({e.msg})") from e
            buffer += more
            continue
        yield index, record
        buffer, index = buffer[end:], index + 1


def _lines(head: str, text) -> Iterator[str]:
    first = head + text.readline()
    yield first
    yield from text


def conversation_rows(record, index: int, name: str) -> list[dict]:
    """The rows of one record: a LLaVA-style record (``conversations`` of ``human``/``gpt`` turns) gives a row per
    question and reply. The last ``Answer:`` in a reply, on a line of its own or inline ("there is a red square.
    Answer: red"), splits it into rationale and answer, and the row's ``response`` is the rationale then an
    ``Answer: ...`` line; a reply with none is the row's answer, with no response. Any other record is a row as
    it is."""
    if not isinstance(record, dict):
        raise SourceDataError(f"{name}: record {index} is a {type(record).__name__}, not a JSON object")
    if "conversations" not in record:
        return [record]
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise SourceDataError(f"{name}: record {index}: 'conversations' is not a list of turns")
    if isinstance(record.get("image"), list):
        raise SourceDataError(f"{name}: record {index}: has {len(record['image'])} images; one image per record")
    base = {k: v for k, v in record.items() if k != "conversations"}
    rows, question = [], None
    for turn in turns:
        speaker, value = turn.get("from"), turn.get("value")
        if speaker in ("human", "user"):
            question = str(value or "").replace("<image>", "").strip()
        elif speaker in ("gpt", "assistant") and question is not None:
            reply = str(value or "").strip()
            rationale, found, answer = reply.rpartition(_ANSWER_PREFIX)  # the last "Answer:", on its line or inline
            rationale, answer = rationale.strip(), answer.strip()
            response = f"{rationale}\n{_ANSWER_PREFIX} {answer}" if rationale else f"{_ANSWER_PREFIX} {answer}"
            row = {
                **base,
                "question": question,
                "answer": base.get("answer") or (answer if found else reply),
                "response": base.get("response") or (response if found else None),
            }
            if "id" in base:
                row["id"] = str(base["id"]) + (f"#{len(rows)}" if rows else "")
            rows.append(row)
            question = None
    if not rows:
        raise SourceDataError(f"{name}: record {index}: no human turn followed by a gpt turn")
    return rows


def read_json_source(file, name: str, options: SourceOptions, resolve: ImageResolver) -> pl.DataFrame:
    """A JSON or JSON Lines file of LLaVA-style records (or flat records of our columns), ``options.batch_rows``
    records at a time; ``resolve`` reads an image path relative to the file."""

    def batches():
        rows = []
        for index, record in json_records(file, name):
            for row in conversation_rows(record, index, name):
                rows.append(
                    {k: v if isinstance(v, (str, bytes)) or v is None else json.dumps(v) for k, v in row.items()}
                )
            if len(rows) >= options.batch_rows:
                yield pl.DataFrame(rows, infer_schema_length=None)
                rows = []
        if rows:
            yield pl.DataFrame(rows, infer_schema_length=None)

    return read_chunks(batches(), name, options, resolve)
