"""The user's data in the formats it ships in: each written with its real library, read, then run through the
smoke loop; and the errors each format's bad input gets."""

import io
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature

from dagster_project.runs.cli import main
from src_assets import source_json
from src_assets.profiles import profile
from src_assets.source_data import (
    SourceDataError,
    SourceOptions,
    check_split_sizes,
    hashed_split,
    prepare_rows,
    synthetic_source,
)
from src_assets.source_files import source_options, user_sources
from src_assets.source_json import read_json_source
from src_assets.storage import Store

# Their column names, as a Hugging Face dataset would have them; source_columns maps ours onto them.
THEIRS = {"id": "uid", "question": "prompt", "answer": "label", "image": "img"}
MAPPING = ",".join(f"{ours}:{theirs}" for ours, theirs in THEIRS.items())


@pytest.fixture(scope="module")
def rows():
    """Smoke-sized rows (the scene columns kept, so that the smoke loop's verifier-trained judge has labels)."""
    return synthetic_source(seed=9, n_sft=60, n_calibrate=16, n_eval=20)


def _their_dict(df: pl.DataFrame) -> dict:
    out = {
        THEIRS.get(c, c): df[c].to_list() for c in ("id", "question", "answer", "response", "scene", "question_spec")
    }
    out["img"] = [{"bytes": b, "path": None} for b in df["image"]]
    return out


def _hf_dataset(df: pl.DataFrame) -> Dataset:
    return Dataset.from_dict(_their_dict(df)).cast_column("img", ImageFeature())


def _hf_splits(df: pl.DataFrame) -> DatasetDict:
    return DatasetDict({s: _hf_dataset(df.filter(pl.col("split") == s)) for s in ("sft", "calibrate", "eval")})


def _llava_records(df: pl.DataFrame, folder: Path) -> list[dict]:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, r in enumerate(df.iter_rows(named=True)):
        (folder / "images" / f"{i}.png").write_bytes(r["image"])
        records.append(
            {
                "id": r["id"],
                "image": f"images/{i}.png",
                "split": r["split"],
                "scene": r["scene"],
                "question_spec": r["question_spec"],
                "conversations": [
                    {"from": "human", "value": "<image>\n" + r["question"]},
                    # every other reply with its answer inline ("... there is a red square. Answer: red")
                    {
                        "from": "gpt",
                        "value": r["response"] if i % 2 else r["response"].replace("\nAnswer:", " Answer:"),
                    },
                ],
            }
        )
    return records


def _cache_as_hub_dataset(dataset: DatasetDict, repo_id: str, hf_home: Path) -> None:
    """``dataset`` in the local Hugging Face cache as ``load_dataset(repo_id)`` finds it offline: prepared by the
    Parquet builder, then placed where the cache of a hub download lies."""
    from datasets import load_dataset_builder

    files = {}
    for split, part in dataset.items():
        files[split] = str(hf_home / f"{split}.parquet")
        part.to_parquet(files[split])
    builder = load_dataset_builder("parquet", data_files=files, cache_dir=str(hf_home / "datasets"))
    builder.download_and_prepare()
    owner, name = repo_id.split("/")
    target = hf_home / "datasets" / f"{owner}___{name}" / "default" / "0.0.0" / ("0" * 40)
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    for arrow in target.glob("parquet-*.arrow"):
        arrow.rename(target / arrow.name.replace("parquet-", f"{name}-"))


def _write(fmt: str, rows: pl.DataFrame, store_dir: Path, tmp_path: Path, monkeypatch) -> list[str]:
    """Writes ``rows`` in format ``fmt`` with its own library; returns the --set lines that read it."""
    source = store_dir / "source"
    source.mkdir(parents=True, exist_ok=True)
    if fmt == "hf_parquet":  # Dataset.to_parquet with an Image feature: the {bytes, path} struct; split by hash
        _hf_dataset(rows).to_parquet(str(source / "train.parquet"))
        return [f"source_columns={MAPPING}", "split_fractions=sft:0.62,calibrate:0.18,eval:0.2"]
    if fmt == "save_to_disk":  # a DatasetDict folder: its split names are the rows' splits
        _hf_splits(rows).save_to_disk(str(source / "vqa"))
        return [f"source_columns={MAPPING}"]
    if fmt in ("llava_json", "llava_jsonl"):
        records = _llava_records(rows, source)
        if fmt == "llava_json":
            (source / "llava.json").write_text(json.dumps(records, indent=1))
        else:
            (source / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return []
    if fmt == "hub":
        import datasets

        # datasets reads HF_HOME once, at import: the cache is pointed at this test's folder directly.
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        _cache_as_hub_dataset(_hf_splits(rows), "someone/scenes-vqa", tmp_path / "hf")
        return [f"source_columns={MAPPING}", "source_datasets=someone/scenes-vqa"]
    raise AssertionError(fmt)


FORMATS = ["hf_parquet", "save_to_disk", "llava_json", "llava_jsonl", "hub"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_smoke_loop_runs_on_each_source_format(fmt, rows, tmp_path, monkeypatch, capsys):
    store_dir = tmp_path / "store"
    settings = _write(fmt, rows, store_dir, tmp_path, monkeypatch)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    args = ["run", "--profile", "smoke", "--iterations", "1", "--store", str(store_dir), "--json"]
    for setting in ["n_sft=0", "n_calibrate=0", "n_eval=0", *settings]:
        args += ["--set", setting]
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert [r["iteration"] for r in json.loads(out.out)] == [0, 1]
    source = Store(str(store_dir)).read_table("assets/vqa_source.parquet")
    assert sorted(source["id"].to_list()) == sorted(rows["id"].to_list())
    assert source.sort("id")["image"].to_list() == rows.sort("id")["image"].to_list()  # the same bytes
    assert source.sort("id")["question"].to_list() == rows.sort("id")["question"].to_list()
    if fmt != "hf_parquet":  # the file's or the dataset's own splits
        assert source.sort("id")["split"].to_list() == rows.sort("id")["split"].to_list()


def test_a_hugging_face_parquet_file_reads_without_a_mapping_where_the_columns_are_ours(rows, tmp_path):
    store = Store(str(tmp_path))
    data = {c: rows[c].to_list() for c in ("id", "split", "question", "answer", "response")}
    data["image"] = [{"bytes": b, "path": None} for b in rows["image"]]
    (tmp_path / "source").mkdir()
    Dataset.from_dict(data).cast_column("image", ImageFeature()).to_parquet(str(tmp_path / "source/hf.parquet"))
    [source] = user_sources(store, profile("smoke"))
    df = source.read(SourceOptions())
    assert df["image"].to_list() == rows["image"].to_list()


def test_split_fractions_split_by_a_stable_hash_of_the_id():
    fractions = {"sft": 0.5, "calibrate": 0.4, "eval": 0.1}
    splits = [hashed_split(f"row-{i}", fractions) for i in range(4000)]
    assert splits == [hashed_split(f"row-{i}", fractions) for i in range(4000)]
    shares = {s: splits.count(s) / len(splits) for s in fractions}
    assert all(abs(shares[s] - fractions[s]) < 0.03 for s in fractions), shares
    with pytest.raises(ValueError, match="sum to 0.9, not 1"):
        profile("smoke", split_fractions="sft:0.5,calibrate:0.4")
    with pytest.raises(ValueError, match=r"setting split_fractions: 'train:1' is not SPLIT:SHARE"):
        profile("smoke", split_fractions="train:1")


def test_bad_mappings_and_missing_splits_name_the_file_and_column(rows):
    df = rows.head(3).rename({"question": "prompt"}).drop("split")
    with pytest.raises(
        SourceDataError, match=r"f\.parquet: has no column 'query', which source_columns reads as 'question'"
    ):
        prepare_rows(df, "f.parquet", SourceOptions(columns={"question": "query"}))
    with pytest.raises(SourceDataError, match=r"f\.parquet: has no 'split' column; add one .* or set split_fractions"):
        prepare_rows(df, "f.parquet", SourceOptions(columns={"question": "prompt"}))
    with pytest.raises(ValueError, match=r"setting source_columns: 'questoin' is not a source column"):
        profile("smoke", source_columns="questoin:prompt")


def test_json_sources_stream_and_name_the_bad_line_or_record(rows, tmp_path, monkeypatch):
    records = _llava_records(rows.head(5), tmp_path)
    monkeypatch.setattr(source_json, "JSON_READ_CHARS", 64)  # records cut across many reads
    array = read_json_source(
        io.BytesIO(json.dumps(records).encode()),
        "a.json",
        SourceOptions(batch_rows=2),
        lambda p: (tmp_path / p).read_bytes(),
    )
    assert array["id"].to_list() == rows.head(5)["id"].to_list()
    assert array["answer"].to_list() == rows.head(5)["answer"].to_list()
    assert array["response"].to_list() == rows.head(5)["response"].to_list()
    lines = "\n".join(json.dumps(r) for r in records[:2]) + "\n{not json\n"
    with pytest.raises(SourceDataError, match=r"b\.jsonl: line 3 is not JSON"):
        read_json_source(io.BytesIO(lines.encode()), "b.jsonl", SourceOptions(), lambda p: b"")
    with pytest.raises(SourceDataError, match=r"c\.json: record 1 of the JSON array is not JSON"):
        read_json_source(io.BytesIO(b'[{"id": "x"}, {"id": '), "c.json", SourceOptions(), lambda p: b"")


def test_an_image_path_that_leaves_the_store_is_refused_naming_the_row(rows, tmp_path):
    store = Store(str(tmp_path / "store"))
    records = _llava_records(rows.head(2), tmp_path / "store" / "source")
    records[1]["image"] = "../../secret.png"
    store.write_bytes("source/x.json", json.dumps(records).encode())
    [source] = user_sources(store, profile("smoke"))
    with pytest.raises(SourceDataError, match=r"x\.json: row 1: column 'image': image path '../../secret.png' is not"):
        source.read(source_options(profile("smoke")))


def test_a_dataset_split_that_is_none_of_ours_is_named(rows, tmp_path):
    store = Store(str(tmp_path))
    DatasetDict({"train": _hf_dataset(rows.head(3))}).save_to_disk(str(tmp_path / "source" / "d"))
    [source] = user_sources(store, profile("smoke"))
    with pytest.raises(SourceDataError, match=r"d \(split 'train'\): the dataset's split 'train' is none of"):
        source.read(source_options(profile("smoke", source_columns=MAPPING)))
    fractions = source.read(source_options(profile("smoke", source_columns=MAPPING, split_fractions="sft:1")))
    assert fractions["split"].to_list() == ["sft"] * 3


def test_split_size_errors_name_the_users_rows_not_synthetic_settings(rows):
    few = rows.filter(pl.col("split") != "calibrate").vstack(rows.filter(pl.col("split") == "calibrate").head(3))
    with pytest.raises(SourceDataError) as e:
        check_split_sizes(few, judge_prompts=128, synthetic=False)
    assert "has 3 'calibrate' rows" in str(e.value) and "add at least 126 rows with split 'calibrate'" in str(e.value)
    assert "n_calibrate" not in str(e.value)
    with pytest.raises(SourceDataError, match="raise n_calibrate"):
        check_split_sizes(few, judge_prompts=128, synthetic=True)
