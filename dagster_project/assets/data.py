"""The data assets: every source row, your judgements, and the tables each stage trains or is evaluated on."""

import polars as pl
from dagster import (
    AssetExecutionContext,
    Failure,
    MetadataValue,
    Output,
    asset,
)

from src_assets.base_stage import PERCEPTION_SCHEMA
from src_assets.base_stage import perception_corpus as perception_corpus_rows
from src_assets.config import TINY
from src_assets.rationale_sft import build_rationale_sft_set
from src_assets.source_data import (
    JUDGEMENT_SCHEMA,
    SourceDataError,
    check_split_sizes,
    combine_sources,
    read_judgements_file,
    synthetic_source,
)
from src_assets.source_files import source_options, user_sources, uses_synthetic_rows
from src_assets.verifier import VERIFIER_JUDGE, check_scenes_to_judge

from ..observe.metadata import counts_table, table_preview, vqa_table_metadata
from ..resources import SettingsResource, StoreResource
from ..versions import reads


@asset(
    group_name="data",
)
@reads(
    "seed",
    "n_sft",
    "n_calibrate",
    "n_eval",
    "min_objects",
    "max_objects",
    "teacher_error_rate",
    "teacher_slip_rate",
    "source_prefix",
    "source_datasets",
    "source_columns",
    "split_fractions",
    "max_source_file_bytes",
    "max_image_pixels",
    "max_text_chars",
    "judge_prompts",
    "judge_model",
    "synthetic_rows",
    stages=("source_data", "source_files", "scenes", "verifier"),
)
def vqa_source(
    context: AssetExecutionContext, settings: SettingsResource, store: StoreResource
) -> Output[pl.DataFrame]:
    """Every (image, question, answer) row: synthetic scenes, the files under the store's source prefix (Parquet,
    LLaVA-style JSON/JSONL, ``datasets`` folders) and the hub datasets of ``source_datasets``."""
    cfg, s = settings.config(), store.store()
    named = []
    sources = user_sources(s, cfg)
    synthetic = uses_synthetic_rows(cfg, bool(sources))
    if synthetic:
        rows = synthetic_source(
            cfg.seed,
            cfg.n_sft,
            cfg.n_calibrate,
            cfg.n_eval,
            cfg.min_objects,
            cfg.max_objects,
            cfg.teacher_error_rate,
            cfg.teacher_slip_rate,
        )
        named.append(("synthetic", rows))
    options = source_options(cfg)
    try:
        for source in sources:
            context.log.info(f"reading source {source.name}")
            named.append((source.name, source.read(options)))
    except SourceDataError as e:
        raise Failure(str(e)) from e
    if not named:
        raise Failure(
            f"no source rows: synthetic rows are off (synthetic_rows={cfg.synthetic_rows}, or their sizes are 0), "
            f"{s.uri(cfg.source_prefix)} holds no Parquet, JSON or datasets files, and source_datasets is empty"
        )
    try:
        df = combine_sources(named)
        check_split_sizes(df, cfg.judge_prompts, synthetic)
        if cfg.judge_model == VERIFIER_JUDGE:
            check_scenes_to_judge(df.filter(pl.col("split") == "calibrate"), "'calibrate' rows")
    except (SourceDataError, ValueError) as e:
        raise Failure(str(e)) from e
    synthetic_count = named[0][1].height if synthetic else 0
    context.add_output_metadata(
        {
            "rows_yours": df.height - synthetic_count,  # where the rows came from, on the step's line
            "rows_synthetic": synthetic_count,
            **vqa_table_metadata(df),
            "source_files": MetadataValue.json([src.name for src in sources]),
        }
    )
    return Output(df, tags=store.tags())


@asset(
    group_name="data",
)
@reads("judgements_prefix", "max_text_chars", stages=("source_data",))
def judgement_tables(
    context: AssetExecutionContext, settings: SettingsResource, store: StoreResource
) -> Output[pl.DataFrame]:
    """The user's own judgements (question, response_a, response_b, verdict) from the Parquet files under the store's
    judgements prefix; they train the judge beside the verifier's labels."""
    cfg, s = settings.config(), store.store()
    files = s.list(cfg.judgements_prefix, ".parquet")
    frames = []
    for key in files:
        context.log.info(f"reading judgement table {s.uri(key)}")
        try:
            frames.append(read_judgements_file(s.read_bytes(key), s.uri(key), cfg.max_text_chars))
        except SourceDataError as e:
            raise Failure(str(e)) from e
    df = pl.concat(frames) if frames else pl.DataFrame(schema=JUDGEMENT_SCHEMA)
    context.add_output_metadata(
        {
            "judgements": df.height,
            "files": MetadataValue.json([s.uri(k) for k in files]),
            "verdicts": MetadataValue.json(dict(df.group_by("verdict").len().iter_rows())),
        }
    )
    return Output(df, tags=store.tags())


@asset(group_name="data")
@reads(stages=("rationale_sft", "scenes"))
def rationale_sft_set(
    context: AssetExecutionContext, vqa_source: pl.DataFrame, store: StoreResource
) -> Output[pl.DataFrame]:
    """The sft rows as (prompt, completion, image), completions in the rationale template."""
    try:
        df = build_rationale_sft_set(vqa_source)
    except SourceDataError as e:
        raise Failure(str(e)) from e
    if df.is_empty():
        raise Failure("vqa_source has no rows with split 'sft'")
    return Output(df, metadata=vqa_table_metadata(df), tags=store.tags())


@asset(group_name="data")
@reads(
    "policy_model",
    "n_base",
    "seed",
    "base_caption_share",
    "min_objects",
    "max_objects",
    "base_answer_form",
    stages=("base_stage", "scenes"),
)
def perception_corpus(
    context: AssetExecutionContext, settings: SettingsResource, store: StoreResource
) -> Output[pl.DataFrame]:
    """The base stage's training rows (tiny policy only): captions of scenes in the rationale's perception sentences,
    and direct answers to the domain's questions, on scenes of their own. Empty for a real policy model."""
    cfg = settings.config()
    if cfg.policy_model != TINY:
        return Output(
            pl.DataFrame(schema=PERCEPTION_SCHEMA),
            metadata={"rows": 0, "skipped": "a real policy model: it has no base stage"},
            tags=store.tags(),
        )
    df = perception_corpus_rows(
        cfg.n_base, cfg.seed, cfg.base_caption_share, cfg.min_objects, cfg.max_objects, cfg.base_answer_form
    )
    metadata = {
        "rows": df.height,
        "question_kinds": counts_table(dict(sorted(df.group_by("kind").len().iter_rows())), "kind"),
        "preview": table_preview(df),
    }
    return Output(df, metadata=metadata, tags=store.tags())


@asset(group_name="data")
@reads()
def eval_set(context: AssetExecutionContext, vqa_source: pl.DataFrame, store: StoreResource) -> Output[pl.DataFrame]:
    """The held-out rows every iteration is evaluated on."""
    df = vqa_source.filter(pl.col("split") == "eval")
    if df.is_empty():
        raise Failure("vqa_source has no rows with split 'eval'")
    return Output(df, metadata=vqa_table_metadata(df), tags=store.tags())
