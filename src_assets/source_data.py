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
| reference | str | no | reference description of the image, read by the judge |
| scene, question_spec | str (JSON) | no | the synthetic domain's ground truth, read by the verifier |

Three formats are read, each streamed (a row group, a shard batch or a few hundred JSON records at a time), each by
a reader of its own that hands this module its rows chunk by chunk (``read_chunks``): ``source_parquet`` (the image
as bytes, or as the ``{bytes, path}`` struct Hugging Face datasets write), ``source_datasets`` (a ``datasets``
folder written by ``save_to_disk``, or a hub dataset from the local cache) and ``source_json`` (LLaVA-style
JSON/JSONL: ``conversations`` of ``human``/``gpt`` turns, the image a path relative to the file). This module
validates: ``SourceOptions`` says how the user's columns map onto ours and how rows without a ``split`` are split.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field

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
    seed: int,
    n_sft: int,
    n_calibrate: int,
    n_eval: int,
    min_objects=2,
    max_objects=5,
    teacher_error_rate: float = 0.0,
    teacher_slip_rate: float = 0.0,
) -> pl.DataFrame:
    """The embedded domain's rows. The ``sft`` rows' responses are written by a fallible teacher: a share
    ``teacher_error_rate`` of them misperceive one object, and a share ``teacher_slip_rate`` slip in one reasoning
    step (``scenes.teacher_response``), the answer staying gold."""
    rows = []
    teacher = random.Random(f"{seed}/teacher")
    for split, n in (("sft", n_sft), ("calibrate", n_calibrate), ("eval", n_eval)):
        for e in generate_examples(n, seed, split, min_objects=min_objects, max_objects=max_objects):
            response = (
                teacher_response(e.scene, e.question, teacher, teacher_error_rate, teacher_slip_rate)
                if split == "sft"
                else None
            )
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
            raise SourceDataError(
                f"{where}: column 'response' is empty, but sft rows need a gold rationale response: a rationale, "
                f"then 'Answer: <answer>' (a LLaVA reply gives one only where it holds 'Answer:' after its rationale)"
            )
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


def parse_source_columns(text: str) -> dict[str, str]:
    """``question:prompt,answer:label`` -> ``{"question": "prompt", "answer": "label"}``: each entry reads our
    column (left) from the user's (right)."""
    mapping = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        ours, sep, theirs = (x.strip() for x in entry.partition(":"))
        if not sep or not ours or not theirs:
            raise ValueError(f"{entry!r} is not OURS:THEIRS, e.g. question:prompt")
        if ours not in SCHEMA:
            raise ValueError(f"{ours!r} is not a source column; expected one of {list(SCHEMA)}")
        if ours in mapping:
            raise ValueError(f"{ours!r} is mapped twice")
        mapping[ours] = theirs
    return mapping


def parse_split_fractions(text: str) -> dict[str, float]:
    """``sft:0.5,calibrate:0.4,eval:0.1`` -> the share of each split, checked to sum to 1."""
    shares = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        split, sep, share = (x.strip() for x in entry.partition(":"))
        if split not in SPLITS or not sep:
            raise ValueError(f"{entry!r} is not SPLIT:SHARE with SPLIT one of {SPLITS}")
        try:
            shares[split] = float(share)
        except ValueError:
            raise ValueError(f"share {share!r} of {split!r} is not a number") from None
        if not 0 <= shares[split] <= 1:
            raise ValueError(f"share {share!r} of {split!r} is not in [0, 1]")
    if shares and abs(sum(shares.values()) - 1) > 1e-6:
        raise ValueError(f"the shares {shares} sum to {sum(shares.values()):g}, not 1")
    return shares


@dataclass(frozen=True)
class SourceOptions:
    """How the user's files are read: column mapping, splitting, and the caps that keep a bad file out."""

    columns: dict[str, str] = field(default_factory=dict)  # our column -> the user's (``parse_source_columns``)
    split_fractions: dict[str, float] = field(default_factory=dict)  # for rows with no ``split`` column
    max_bytes: int = MAX_FILE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_text_chars: int = MAX_TEXT_CHARS
    batch_rows: int = 256  # rows validated at a time from a dataset or a JSON file


def hashed_split(row_id: str, fractions: dict[str, float]) -> str:
    """The split of a row by a stable hash of its id: the same id lands in the same split on every run."""
    u = int(hashlib.sha256(row_id.encode()).hexdigest()[:15], 16) / 16**15
    total = 0.0
    for split in SPLITS:
        total += fractions.get(split, 0.0)
        if u < total:
            return split
    return next(s for s in reversed(SPLITS) if fractions.get(s, 0.0) > 0)


ImageResolver = Callable[[str], bytes]  # an image path (relative to its source file) -> its bytes


def no_image_files(path: str) -> bytes:
    raise SourceDataError(f"the image is a path ({quoted(path)}), and this source cannot read image files")


def _image_bytes(value, resolve: ImageResolver):
    """A cell of the image column as bytes: bytes as they are, the ``{bytes, path}`` struct of Hugging Face
    datasets (its bytes, or the file at its path), or a path."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        return value.get("bytes") if value.get("bytes") is not None else _image_bytes(value.get("path"), resolve)
    if isinstance(value, str):
        return resolve(value) if value.strip() else None
    return value  # validation names what it is


def prepare_rows(
    df: pl.DataFrame,
    name: str,
    options: SourceOptions,
    first_row: int = 0,
    resolve: ImageResolver = no_image_files,
    split: str | None = None,
) -> pl.DataFrame:
    """The user's rows as a validated source table: their columns renamed (``options.columns``), the image as
    bytes, an id where they have none (``<file>#<row>``), a split where they have none (``split``, a dataset's own
    split name, or ``options.split_fractions`` by a hash of the id)."""
    missing = {ours: theirs for ours, theirs in options.columns.items() if theirs not in df.columns}
    if missing:
        ours, theirs = next(iter(missing.items()))
        raise SourceDataError(
            f"{name}: has no column {theirs!r}, which source_columns reads as {ours!r}; its columns are {df.columns}"
        )
    df = df.drop([c for c in options.columns if c in df.columns and c not in options.columns.values()])
    df = df.rename({theirs: ours for ours, theirs in options.columns.items() if theirs != ours})
    unnamed = [c for c in ("question", "answer", "image") if c not in df.columns]  # id and split can be made
    if unnamed:
        example = ",".join(f"{c}:<your {c} column>" for c in unnamed)
        raise SourceDataError(
            f"{name}: has no column {' or '.join(repr(c) for c in unnamed)}; its columns are {df.columns}. Name "
            f"yours with source_columns, e.g. source_columns={example}"
        )
    if "image" in df.columns and df.schema["image"] not in (pl.Binary, pl.Null):
        images = []
        for i, value in enumerate(df["image"].to_list(), start=first_row):
            try:
                images.append(_image_bytes(value, resolve))
            except SourceDataError as e:
                raise SourceDataError(f"{name}: row {i}: column 'image': {e}") from e
            if images[-1] is not None and not isinstance(images[-1], bytes):
                raise SourceDataError(
                    f"{name}: row {i}: column 'image' holds {quoted(value)}; expected image bytes, the "
                    f"{{bytes, path}} struct of Hugging Face datasets, or a path"
                )
        df = df.with_columns(pl.Series("image", images, dtype=pl.Binary))
    if "id" not in df.columns:
        stem = name.rstrip("/").rsplit("/", 1)[-1]
        df = df.with_columns(pl.Series("id", [f"{stem}#{i}" for i in range(first_row, first_row + df.height)]))
    if "split" not in df.columns:
        if split is None and not options.split_fractions:
            raise SourceDataError(
                f"{name}: has no 'split' column; add one (sft, calibrate or eval per row), or set "
                f"split_fractions=sft:0.5,calibrate:0.4,eval:0.1 to split the rows by a hash of their id"
            )
        splits = [split or hashed_split(str(i), options.split_fractions) for i in df["id"].to_list()]
        df = df.with_columns(pl.Series("split", splits, dtype=pl.String))
    return validate_source(df, name, options.max_image_pixels, first_row, options.max_text_chars)


def read_chunks(chunks, name: str, options: SourceOptions, resolve: ImageResolver, empty=None, split=None):
    parts, offset = [], 0
    for df in chunks:
        parts.append(prepare_rows(df, name, options, offset, resolve, split))
        offset += df.height
    if not parts:
        if empty is None:
            return pl.DataFrame(schema=SCHEMA)
        return prepare_rows(pl.from_arrow(empty), name, options, resolve=resolve, split=split)
    if len(parts) == 1:
        return parts[0]
    return combine_sources([(f"{name} (part {i})", p) for i, p in enumerate(parts)])


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


# --- The user's own judgements, to train the judge where no verifier exists --------------------------------

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


def check_split_sizes(df: pl.DataFrame, judge_prompts: int, synthetic: bool = True) -> None:
    """Every stage has rows to work on, checked once the source is read, before anything trains. The advice names
    what the user can change: their own rows, and the synthetic sizes only where synthetic data is on."""
    counts = dict(df.group_by("split").len().iter_rows())
    for split, why in (("sft", "rationale SFT"), ("eval", "evaluation")):
        if not counts.get(split):
            more = f"set n_{split} > 0 or " if synthetic else ""
            raise SourceDataError(
                f"the source has no {split!r} rows, which {why} needs: {more}add rows with split {split!r} to your "
                f"data (or set split_fractions with a share for {split!r})"
            )
    calibrate = counts.get("calibrate", 0)
    if calibrate <= judge_prompts:
        more = "raise n_calibrate, " if synthetic else ""
        raise SourceDataError(
            f"the source has {calibrate} 'calibrate' rows, but the first judge_prompts={judge_prompts} of them "
            f"train the judge and the iterations need at least one more: {more}add at least "
            f"{judge_prompts + 1 - calibrate} rows with split 'calibrate' to your data"
            + (f", or lower judge_prompts to at most {calibrate - 1}" if calibrate >= 2 else "")
        )


def judge_prompt_rows(df: pl.DataFrame, judge_prompts: int) -> pl.DataFrame:
    """The judge's training prompts: the first ``judge_prompts`` calibrate rows. No iteration calibrates on
    them, so the judge is always measured on prompts it did not train on."""
    return df.filter(pl.col("split") == "calibrate").head(judge_prompts)


def iteration_prompt_rows(df: pl.DataFrame, iteration: int, n: int, judge_prompts: int) -> pl.DataFrame:
    """Iteration ``iteration``'s prompts (1-based): the next ``n`` calibrate rows after the judge's, iteration
    after iteration, wrapping around within those rows (never into the judge's)."""
    rows = df.filter(pl.col("split") == "calibrate").slice(judge_prompts)
    if rows.is_empty():
        raise SourceDataError(
            f"no 'calibrate' rows are left to calibrate on after the judge's judge_prompts={judge_prompts}"
        )
    start = ((iteration - 1) * n) % rows.height
    take = rows.slice(start, n)
    if take.height < n:
        take = pl.concat([take, rows.head(min(n - take.height, rows.height - take.height))])
    return take
