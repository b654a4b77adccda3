import io

import polars as pl
import pytest

from src_assets.rationale_sft import build_rationale_sft_set
from src_assets.source_data import (
    SCHEMA,
    SourceDataError,
    combine_sources,
    synthetic_source,
    validate_source,
)
from src_assets.source_parquet import read_parquet_source


@pytest.fixture(scope="module")
def source():
    return synthetic_source(seed=0, n_sft=10, n_calibrate=5, n_eval=5)


def _parquet(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def test_synthetic_source_has_the_schema_and_splits(source):
    assert source.schema == pl.Schema(SCHEMA)
    assert source.group_by("split").len().sort("split").rows() == [("calibrate", 5), ("eval", 5), ("sft", 10)]
    assert validate_source(source, "synthetic").equals(source)


def test_user_file_round_trips_through_parquet(source):
    minimal = source.select("id", "split", "question", "answer", "image", "response")
    df = read_parquet_source(_parquet(minimal), "s3://bucket/source/mine.parquet")
    assert df.columns == list(SCHEMA)
    assert df["kind"].unique().to_list() == ["open"]


def test_missing_column_names_the_file_and_column(source):
    with pytest.raises(
        SourceDataError,
        match=r"s3://b/source/x\.parquet: has no column 'answer'; its columns are \[.*\]\. Name yours with "
        r"source_columns, e\.g\. source_columns=answer:<your answer column>$",
    ):
        read_parquet_source(_parquet(source.drop("answer")), "s3://b/source/x.parquet")


def test_corrupt_png_names_the_row_and_column(source):
    bad = (
        source.with_row_index()
        .with_columns(
            pl.when(pl.col("index") == 3)
            .then(pl.lit(b"\x89PNG\r\n\x1a\nnot really"))
            .otherwise(pl.col("image"))
            .alias("image")
        )
        .drop("index")
    )
    with pytest.raises(
        SourceDataError,
        match=r"f\.parquet: row 3 \(id 'sft-0-000003'\): column 'image' does not hold a decodable image",
    ):
        read_parquet_source(_parquet(bad), "f.parquet")


def test_unknown_question_kind_names_the_row_and_value(source):
    bad = source.with_columns(
        pl.when(pl.col("id") == "sft-0-000004").then(pl.lit("colour")).otherwise(pl.col("kind")).alias("kind")
    )
    with pytest.raises(
        SourceDataError,
        match=r"f\.parquet: row 4 \(id 'sft-0-000004'\): column 'kind' has unknown question kind 'colour'",
    ):
        validate_source(bad, "f.parquet")


def test_other_bad_values_are_named(source):
    with pytest.raises(SourceDataError, match=r"column 'split' has unknown value 'test'"):
        validate_source(source.with_columns(pl.lit("test").alias("split")), "f.parquet")
    with pytest.raises(SourceDataError, match=r"row 0 .*column 'question' is empty"):
        validate_source(source.with_columns(pl.lit("").alias("question")), "f.parquet")
    with pytest.raises(SourceDataError, match=r"column 'answer' has type Int32, expected String"):
        validate_source(source.with_columns(pl.lit(1).alias("answer")), "f.parquet")
    with pytest.raises(SourceDataError, match=r"f\.parquet: not a readable Parquet file"):
        read_parquet_source(b"PAR1 garbage", "f.parquet")
    with pytest.raises(SourceDataError, match=r"column 'id' has duplicate values \['sft-0-000000'\]"):
        validate_source(pl.concat([source.head(1), source.head(1)]), "f.parquet")


def test_an_id_in_two_files_names_both(source):
    with pytest.raises(
        SourceDataError, match=r"b\.parquet: column 'id' value 'sft-0-000000' is also used in a\.parquet"
    ):
        combine_sources([("a.parquet", source), ("b.parquet", source.head(1))])


def test_rationale_sft_set_takes_sft_rows_in_template(source):
    sft = build_rationale_sft_set(source)
    assert sft.height == 10 and sft.columns == ["id", "kind", "question", "completion", "image"]
    assert all(c.split("\n")[-1].startswith("Answer: ") for c in sft["completion"])


def test_rationale_sft_set_rejects_off_template_responses(source):
    bad = source.with_columns(
        pl.when(pl.col("id") == "sft-0-000002").then(pl.lit("just two")).otherwise(pl.col("response")).alias("response")
    )
    with pytest.raises(
        SourceDataError, match=r"sft row 'sft-0-000002': column 'response' is not in the rationale template"
    ):
        build_rationale_sft_set(bad)
    wrong = source.with_columns(
        pl.when(pl.col("id") == "sft-0-000001").then(pl.lit("zzz")).otherwise(pl.col("answer")).alias("answer")
    )
    with pytest.raises(
        SourceDataError, match=r"sft row 'sft-0-000001': column 'response' answers .* but column 'answer' is 'zzz'"
    ):
        build_rationale_sft_set(wrong)


def _png(width, height) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (255, 255, 255)).save(buf, format="PNG")  # a few kB: PNG compresses flat colour
    return buf.getvalue()


def test_a_decompression_bomb_is_refused_before_it_is_decoded(source):
    bomb = _png(6000, 6000)  # 36 Mpixel, over the default 16.8 Mpixel cap, in about 100 kB
    assert len(bomb) < 500_000
    df = source.head(3).with_columns(
        pl.Series("image", [source["image"][0], bomb, source["image"][0]], dtype=pl.Binary)
    )
    with pytest.raises(
        SourceDataError, match=r"mine.parquet: row 1 .*column 'image': the image is 6000x6000 pixels, over the cap"
    ):
        read_parquet_source(_parquet(df), "mine.parquet")
    read_parquet_source(_parquet(df), "mine.parquet", max_image_pixels=6000 * 6000)  # the cap is a setting


def test_an_oversized_file_is_refused_unread(source):
    with pytest.raises(SourceDataError, match="the file is 5000000000 bytes, over the cap"):
        read_parquet_source(io.BytesIO(b"not even parquet"), "huge.parquet", size=5_000_000_000)


def test_rows_are_numbered_across_row_groups_and_values_are_cut(source):
    df = source.with_columns(
        pl.when(pl.int_range(pl.len()) == 17).then(pl.lit("x" * 200_000)).otherwise(pl.col("split")).alias("split")
    )
    buf = io.BytesIO()
    df.write_parquet(buf, row_group_size=5)
    with pytest.raises(SourceDataError) as error:
        read_parquet_source(
            buf.getvalue(), "groups.parquet", max_text_chars=1_000_000
        )  # under the text cap: the value check
    message = str(error.value)
    assert "groups.parquet: row 17 " in message and "column 'split' has unknown value 'xxx" in message
    assert len(message) < 400 and "(200002 characters)" in message


def test_a_text_bomb_is_refused_naming_the_row_and_column_and_a_bloated_row_group_unread(source):
    # Two million characters of one letter compress to a few kB: the file's size says nothing about what it holds.
    df = source.head(3).with_columns(pl.Series("question", ["what?", "x" * 2_000_000, "what?"]))
    data = _parquet(df)
    assert len(data) < 100_000
    with pytest.raises(
        SourceDataError,
        match=r"bomb.parquet: row 1 \(id .*\): column 'question' holds 2000000 "
        r"characters, over the cap of 65536 \(max_text_chars\)",
    ):
        read_parquet_source(data, "bomb.parquet")
    assert read_parquet_source(data, "bomb.parquet", max_text_chars=2_000_000).height == 3  # the cap is a setting
    # The footer says how far each row group inflates; a row group over the file cap is refused before it is read.
    with pytest.raises(
        SourceDataError,
        match=r"bomb.parquet: row group 0 inflates to \d+ bytes, over the cap of "
        r"1000000 \(max_source_file_bytes\)",
    ):
        read_parquet_source(data, "bomb.parquet", max_bytes=1_000_000)


@pytest.mark.parametrize(
    "reply, answer, response",
    [
        ("There is a red square.\nAnswer: red", "red", "There is a red square.\nAnswer: red"),
        ("there is a red square. Answer: red", "red", "there is a red square.\nAnswer: red"),
        (
            "Answer: maybe blue. On reflection, the square is red. Answer: red",
            "red",
            "Answer: maybe blue. On reflection, the square is red.\nAnswer: red",
        ),
        ("Answer: red", "red", "Answer: red"),
        ("red", "red", None),
    ],
)
def test_a_llava_reply_is_split_at_its_last_answer_whether_on_its_own_line_or_inline(reply, answer, response):
    from src_assets.source_json import conversation_rows

    record = {
        "id": "r1",
        "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": reply}],
    }
    (row,) = conversation_rows(record, 0, "llava.json")
    assert (row["question"], row["answer"], row["response"]) == ("What color?", answer, response)


def test_an_sft_row_without_a_rationale_says_what_a_response_needs(source):
    bare = source.filter(pl.col("split") == "sft").head(1).with_columns(pl.lit(None, pl.String).alias("response"))
    with pytest.raises(
        SourceDataError,
        match=r"column 'response' is empty, but sft rows need a gold rationale "
        r"response: a rationale, then 'Answer: <answer>' \(a LLaVA reply gives one only where it "
        r"holds 'Answer:' after its rationale\)",
    ):
        validate_source(bare, "llava.json")
