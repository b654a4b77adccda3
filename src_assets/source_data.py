"""The VQA source table: the synthetic default, or the user's own Parquet files, validated.

One row per (image, question). Columns:

| column | type | required | meaning |
|---|---|---|---|
| id | str | yes | unique row id |
| split | str | yes | ``sft`` (rationale fine-tuning), ``calibrate`` (SRC iterations) or ``eval`` (held out) |
| question | str | yes | the question text |
| answer | str | yes | the ground-truth answer |
| image | binary | yes | the image, PNG or JPEG bytes |
| kind | str | no | question kind: one of the domain's, or ``open`` (default) |
| response | str | for ``sft`` rows | gold rationale then ``Answer: ...`` |
| reference | str | no | reference description of the image, read by the R-Scorer |
| scene, question_spec | str (JSON) | no | the synthetic domain's ground truth, read by the verifier |
"""

from __future__ import annotations

import io
import random

import polars as pl
from PIL import Image, UnidentifiedImageError

from .scenes import QUESTION_KINDS, Question, Scene, generate_examples, teacher_response

SPLITS = ("sft", "calibrate", "eval")
KINDS = (*QUESTION_KINDS, "open")
REQUIRED = {"id": pl.String, "split": pl.String, "question": pl.String, "answer": pl.String, "image": pl.Binary}
OPTIONAL = {
    "kind": pl.String,
    "response": pl.String,
    "reference": pl.String,
    "scene": pl.String,
    "question_spec": pl.String,
}
SCHEMA = {**REQUIRED, **OPTIONAL}


class SourceDataError(ValueError):
    """Bad source data; the message names the file, column, row and value."""


def synthetic_source(
    seed: int, n_sft: int, n_calibrate: int, n_eval: int, min_objects=2, max_objects=5, teacher_error_rate: float = 0.0
) -> pl.DataFrame:
    """The embedded domain's rows. The ``sft`` rows' responses are written by a fallible teacher: a share
    ``teacher_error_rate`` of them misperceive one object (``scenes.teacher_response``), the answer staying gold."""
    rows = []
    teacher = random.Random(f"{seed}/teacher")
    for split, n in (("sft", n_sft), ("calibrate", n_calibrate), ("eval", n_eval)):
        for e in generate_examples(n, seed, split, min_objects=min_objects, max_objects=max_objects):
            response = teacher_response(e.scene, e.question, teacher, teacher_error_rate) if split == "sft" else None
            rows.append(e.row(response))
    return pl.DataFrame(rows, schema=SCHEMA)


MAX_IMAGE_PIXELS = 4096 * 4096  # the default cap on one image's area (width x height), checked before decoding
MAX_FILE_BYTES = 4 * 2**30  # the default cap on one source file's size, checked before reading it
MAX_TEXT_CHARS = 65536  # the default cap on one text cell, checked after decompression, one row group at a time


def quoted(value, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters: a bad value is shown, not copied whole into the log."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    with Image.open(io.BytesIO(data)) as image:
        # The header gives the size; a decompression bomb is refused before its pixels are inflated.
        width, height = image.size
        if width * height > max_pixels:
            raise SourceDataError(
                f"the image is {width}x{height} pixels, over the cap of {max_pixels} "
                f"(max_image_pixels); a decompression bomb or an oversized image"
            )
        image.load()


def _conform(df: pl.DataFrame, name: str, required: dict, optional: dict, what: str) -> pl.DataFrame:
    """``df`` with exactly the required then optional columns, in their types; missing optional ones are null."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SourceDataError(f"{name}: missing required column(s) {missing}; {what} needs {list(required)}")
    schema = {**required, **optional}
    for col, dtype in schema.items():
        if col in df.columns and df.schema[col] != dtype and df.schema[col] != pl.Null:
            raise SourceDataError(f"{name}: column {col!r} has type {df.schema[col]}, expected {dtype}")
    df = df.with_columns([pl.lit(None, dtype=t).alias(c) for c, t in optional.items() if c not in df.columns])
    return df.select([pl.col(c).cast(t) for c, t in schema.items()])


def _check_text_lengths(df: pl.DataFrame, name: str, max_chars: int, first_row: int) -> None:
    # A few KiB of Parquet can inflate to hundreds of MiB of text; one such cell would be tokenized, stored and
    # logged. The check is vectorised, so that it costs little next to reading the row group.
    for col, dtype in df.schema.items():
        if dtype != pl.String:
            continue
        lengths = df[col].str.len_chars()
        over = (lengths > max_chars).arg_true()
        if len(over):
            i = over[0]
            row = f"row {first_row + i}" + (f" (id {quoted(df['id'][i])})" if "id" in df.columns else "")
            raise SourceDataError(
                f"{name}: {row}: column {col!r} holds "
                f"{lengths[i]} characters, over the cap of {max_chars} (max_text_chars)"
            )


def validate_source(
    df: pl.DataFrame,
    name: str,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    first_row: int = 0,
    max_text_chars: int = MAX_TEXT_CHARS,
) -> pl.DataFrame:
    """Checks a source table and returns it with every column of ``SCHEMA``; ``name`` is used in errors, and rows are
    numbered from ``first_row`` (a row group's offset in its file)."""
    df = _conform(df, name, REQUIRED, OPTIONAL, "a source table").with_columns(pl.col("kind").fill_null("open"))
    _check_text_lengths(df, name, max_text_chars, first_row)

    for i, row in enumerate(df.iter_rows(named=True), start=first_row):
        where = f"{name}: row {i} (id {quoted(row['id'])})"
        for col in REQUIRED:
            if row[col] is None or (col != "image" and not str(row[col]).strip()):
                raise SourceDataError(f"{where}: column {col!r} is empty")
        if row["split"] not in SPLITS:
            raise SourceDataError(
                f"{where}: column 'split' has unknown value {quoted(row['split'])}; expected one of {SPLITS}"
            )
        if row["kind"] not in KINDS:
            raise SourceDataError(
                f"{where}: column 'kind' has unknown question kind {quoted(row['kind'])}; expected one of {KINDS}"
            )
        if row["split"] == "sft" and not row["response"]:
            raise SourceDataError(f"{where}: column 'response' is empty, but sft rows need a gold rationale response")
        try:
            _check_image(row["image"], max_image_pixels)
        except SourceDataError as e:
            raise SourceDataError(f"{where}: column 'image': {e}") from e
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise SourceDataError(f"{where}: column 'image' does not hold a decodable image ({quoted(str(e))})") from e
        if row["scene"] is not None or row["question_spec"] is not None:
            try:
                Scene.from_json(row["scene"])
                Question.from_json(row["question_spec"])
            except (TypeError, ValueError, KeyError) as e:
                raise SourceDataError(
                    f"{where}: columns 'scene'/'question_spec' are not valid domain JSON ({e})"
                ) from e
    duplicated = df.filter(pl.col("id").is_duplicated())["id"].unique().to_list()
    if duplicated:
        raise SourceDataError(f"{name}: column 'id' has duplicate values {quoted(duplicated[:5])}")
    return df


def read_source_file(
    file,
    name: str,
    size: int | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_text_chars: int = MAX_TEXT_CHARS,
) -> pl.DataFrame:
    """Parses and validates one Parquet file (bytes or an open binary file), one row group at a time, so that a bad
    row stops the read where it is; ``name`` (its URI) is used in errors. A file over ``max_bytes`` is refused
    unread, and so is a row group whose footer says it inflates to more than ``max_bytes``."""
    import pyarrow.parquet as pq

    if isinstance(file, bytes):
        size, file = len(file), io.BytesIO(file)
    if size is not None and size > max_bytes:
        raise SourceDataError(f"{name}: the file is {size} bytes, over the cap of {max_bytes} (max_source_file_bytes)")
    try:
        parquet = pq.ParquetFile(file)
    except Exception as e:
        raise SourceDataError(f"{name}: not a readable Parquet file ({quoted(str(e))})") from e
    parts, offset = [], 0
    for group in range(parquet.num_row_groups):
        inflated = parquet.metadata.row_group(group).total_byte_size
        if inflated > max_bytes:
            raise SourceDataError(
                f"{name}: row group {group} inflates to {inflated} bytes, over the cap of {max_bytes} "
                f"(max_source_file_bytes)"
            )
        try:
            df = pl.from_arrow(parquet.read_row_group(group))
        except Exception as e:
            raise SourceDataError(f"{name}: row group {group} is not readable ({quoted(str(e))})") from e
        parts.append(validate_source(df, name, max_image_pixels, first_row=offset, max_text_chars=max_text_chars))
        offset += df.height
    if not parts:
        return validate_source(
            pl.from_arrow(parquet.schema_arrow.empty_table()), name, max_image_pixels, max_text_chars=max_text_chars
        )
    return (
        combine_sources([(f"{name} (row group {i})", p) for i, p in enumerate(parts)]) if len(parts) > 1 else parts[0]
    )


def combine_sources(named_frames: list[tuple[str, pl.DataFrame]]) -> pl.DataFrame:
    """Concatenates validated tables; an id used by two files is an error naming both."""
    if not named_frames:
        return pl.DataFrame(schema=SCHEMA)
    owner: dict[str, str] = {}
    for name, df in named_frames:
        for row_id in df["id"].to_list():
            if row_id in owner:
                raise SourceDataError(f"{name}: column 'id' value {quoted(row_id)} is also used in {owner[row_id]}")
            owner[row_id] = name
    return pl.concat([df for _, df in named_frames], how="vertical")


# --- The user's own judgements, to train the R-Scorer where no verifier exists --------------------------------

JUDGEMENT_REQUIRED = {"question": pl.String, "response_a": pl.String, "response_b": pl.String, "verdict": pl.String}
JUDGEMENT_OPTIONAL = {"reference": pl.String, "answer": pl.String}
JUDGEMENT_SCHEMA = {**JUDGEMENT_REQUIRED, **JUDGEMENT_OPTIONAL}
JUDGEMENT_VERDICTS = ("A", "B", "tie")


def validate_judgements(df: pl.DataFrame, name: str, max_text_chars: int = MAX_TEXT_CHARS) -> pl.DataFrame:
    """Checks a judgement table (one row per judged pair: ``verdict`` is ``A`` when ``response_a`` is the better
    response, ``B`` for ``response_b``, ``tie``) and returns it with every column of ``JUDGEMENT_SCHEMA``."""
    df = _conform(df, name, JUDGEMENT_REQUIRED, JUDGEMENT_OPTIONAL, "a judgement table")
    _check_text_lengths(df, name, max_text_chars, first_row=0)
    for i, row in enumerate(df.iter_rows(named=True)):
        for col in JUDGEMENT_REQUIRED:
            if row[col] is None or not row[col].strip():
                raise SourceDataError(f"{name}: row {i}: column {col!r} is empty")
        if row["verdict"] not in JUDGEMENT_VERDICTS:
            raise SourceDataError(
                f"{name}: row {i}: column 'verdict' has value {row['verdict'][:40]!r}; "
                f"expected one of {JUDGEMENT_VERDICTS}"
            )
    return df


def read_judgements_file(data: bytes, name: str, max_text_chars: int = MAX_TEXT_CHARS) -> pl.DataFrame:
    try:
        df = pl.read_parquet(io.BytesIO(data))
    except Exception as e:
        raise SourceDataError(f"{name}: not a readable Parquet file ({e})") from e
    return validate_judgements(df, name, max_text_chars)


def check_split_sizes(df: pl.DataFrame, scorer_prompts: int) -> None:
    """Every stage has rows to work on, checked once the source is read, before anything trains."""
    counts = dict(df.group_by("split").len().iter_rows())
    for split, why in (("sft", "rationale SFT"), ("eval", "evaluation")):
        if not counts.get(split):
            raise SourceDataError(
                f"the source has no {split!r} rows, which {why} needs: set n_{split} > 0 or add {split!r} "
                f"rows to your Parquet files"
            )
    calibrate = counts.get("calibrate", 0)
    if calibrate <= scorer_prompts:
        raise SourceDataError(
            f"the source has {calibrate} 'calibrate' rows, but the first scorer_prompts={scorer_prompts} of "
            f"them train the R-Scorer and the iterations need more: raise n_calibrate or lower scorer_prompts"
        )


def scorer_prompt_rows(df: pl.DataFrame, scorer_prompts: int) -> pl.DataFrame:
    """The R-Scorer's training prompts: the first ``scorer_prompts`` calibrate rows. No iteration calibrates on
    them, so the judge is always measured on prompts it did not train on."""
    return df.filter(pl.col("split") == "calibrate").head(scorer_prompts)


def iteration_prompt_rows(df: pl.DataFrame, iteration: int, n: int, scorer_prompts: int) -> pl.DataFrame:
    """Iteration ``iteration``'s prompts (1-based): the next ``n`` calibrate rows after the R-Scorer's, iteration
    after iteration, wrapping around within those rows (never into the R-Scorer's)."""
    rows = df.filter(pl.col("split") == "calibrate").slice(scorer_prompts)
    if rows.is_empty():
        raise SourceDataError(
            f"no 'calibrate' rows are left to calibrate on after the R-Scorer's scorer_prompts={scorer_prompts}"
        )
    start = ((iteration - 1) * n) % rows.height
    take = rows.slice(start, n)
    if take.height < n:
        take = pl.concat([take, rows.head(min(n - take.height, rows.height - take.height))])
    return take
