"""Jobs, the schedule and the sensor: how iterations get started without a person clicking."""

import json
import os
import uuid

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    load_assets_from_modules,
    schedule,
    sensor,
)

from src_assets.fingerprints import digest
from src_assets.source_files import source_file_keys

from .assets import evaluation, iteration, sharded
from .assets.partitions import iteration_partitions, next_iteration
from .resources import SettingsResource, StoreResource
from .tags import ITERATION_RUN_TAGS

# The iteration's assets are the ones partitioned by iteration; every other asset is the foundation they read.
ITERATION_ASSETS = tuple(
    key.to_user_string()
    for a in load_assets_from_modules([iteration, sharded, evaluation])
    if a.partitions_def == iteration_partitions
    for key in a.keys
)

foundation_job = define_asset_job(
    "src_foundation",
    selection=AssetSelection.all() - AssetSelection.assets(*ITERATION_ASSETS),
    description="Data, base models, rationale SFT, the judge and the SFT evaluation (iteration 0).",
)
iteration_job = define_asset_job(
    "src_iteration",
    selection=AssetSelection.assets(*ITERATION_ASSETS),
    partitions_def=iteration_partitions,
    tags=ITERATION_RUN_TAGS,
    description="One SRC iteration: candidates, pairwise scores, preferences, weighted DPO, evaluation.",
)


new_data_job = define_asset_job(
    "src_new_data_iteration",
    selection=AssetSelection.assets("vqa_source", "eval_set", *ITERATION_ASSETS),
    partitions_def=iteration_partitions,
    tags=ITERATION_RUN_TAGS,
    description="New source data: the source table read and validated again (new files included), then one iteration.",
)


@sensor(
    job=new_data_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.STOPPED,
    description="New source files (Parquet, JSON, datasets folders) under the store's source prefix: read them into "
    "the source table and run the next iteration.",
)
def new_source_data_sensor(context: SensorEvaluationContext, store: StoreResource, settings: SettingsResource):
    s = store.store()
    files = source_file_keys(s, settings.config().source_prefix)
    # The cursor keys files by content, so a file fixed in place, or completed after a partial copy, is new again.
    seen = json.loads(context.cursor) if context.cursor else {}
    seen = seen if isinstance(seen, dict) else {}  # a cursor of an older version (a list of names): read all again
    digests = s.content_digests(files, seen)
    new = sorted(f for f in files if seen.get(f, {}).get("sha256") != digests[f]["sha256"])
    if not new:
        return SkipReason(f"no new or changed source files under {s.uri(settings.config().source_prefix)}")
    key = next_iteration(s)
    context.log.info(f"{len(new)} new or changed source file(s) ({', '.join(new[:3])}...): starting iteration {key}")
    # The run key names the files' contents, so the same iteration can be asked for again when data changes.
    contents = digest(sorted((f, d["sha256"]) for f, d in digests.items()))
    return SensorResult(
        run_requests=[
            RunRequest(partition_key=key, run_key=f"iteration-{key}-{contents}", tags={"src/new_files": str(len(new))})
        ],
        dynamic_partitions_requests=[iteration_partitions.build_add_request([key])],
        cursor=json.dumps(digests, sort_keys=True),
    )


@schedule(
    job=iteration_job,
    cron_schedule=os.environ.get("SRC_SCHEDULE_CRON", "0 3 * * 1"),
    default_status=DefaultScheduleStatus.STOPPED,
    description="Runs the next iteration on a cron (SRC_SCHEDULE_CRON).",
)
def iteration_schedule(context: ScheduleEvaluationContext, store: StoreResource):
    key = next_iteration(store.store())
    context.instance.add_dynamic_partitions(iteration_partitions.name, [key])
    # One run key per tick, so an iteration that failed on one tick is asked for again on the next.
    return RunRequest(partition_key=key, run_key=f"iteration-{key}-{uuid.uuid4().hex[:12]}")
