"""Jobs, the schedule and the sensor: how iterations get started without a person clicking."""

import json
import os

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    schedule,
    sensor,
)

from .loop_assets import iteration_key, iteration_partitions
from .resources import SettingsResource, StoreResource

ITERATION_ASSETS = ("candidate_pool", "pairwise_scores", "preference_set", "policy_checkpoint", "iteration_eval")
# Runs of this job carry this tag; dagster.yaml's run queue lets one such run go at a time, so iterations run in order.
ITERATION_TAG = {"src/iteration_run": "true"}

foundation_job = define_asset_job(
    "src_foundation",
    selection=AssetSelection.all() - AssetSelection.assets(*ITERATION_ASSETS),
    description="Data, base models, rationale SFT, the R-Scorer and the SFT evaluation (iteration 0).",
)
iteration_job = define_asset_job(
    "src_iteration",
    selection=AssetSelection.assets(*ITERATION_ASSETS),
    partitions_def=iteration_partitions,
    tags=ITERATION_TAG,
    description="One SRC iteration: candidates, pairwise scores, preferences, weighted DPO, evaluation.",
)


def next_iteration(instance) -> str:
    keys = instance.get_dynamic_partitions(iteration_partitions.name)
    return iteration_key(max((int(k) for k in keys), default=0) + 1)


@sensor(job=iteration_job, minimum_interval_seconds=60, default_status=DefaultSensorStatus.STOPPED,
        description="New Parquet files under the store's source prefix: add the next iteration and run it.")
def new_source_data_sensor(context: SensorEvaluationContext, store: StoreResource, settings: SettingsResource):
    s = store.store()
    files = s.list(settings.config().source_prefix, ".parquet")
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    new = sorted(set(files) - seen)
    if not new:
        return SkipReason(f"no new Parquet files under {s.uri(settings.config().source_prefix)}")
    key = next_iteration(context.instance)
    context.log.info(f"{len(new)} new source file(s) ({', '.join(new[:3])}...): starting iteration {key}")
    return SensorResult(
        run_requests=[RunRequest(partition_key=key, run_key=f"iteration-{key}", tags={"src/new_files": str(len(new))})],
        dynamic_partitions_requests=[iteration_partitions.build_add_request([key])],
        cursor=json.dumps(sorted(files)),
    )


@schedule(job=iteration_job, cron_schedule=os.environ.get("SRC_SCHEDULE_CRON", "0 3 * * 1"),
          default_status=DefaultScheduleStatus.STOPPED, description="Runs the next iteration on a cron (SRC_SCHEDULE_CRON).")
def iteration_schedule(context):
    key = next_iteration(context.instance)
    context.instance.add_dynamic_partitions(iteration_partitions.name, [key])
    return RunRequest(partition_key=key, run_key=f"iteration-{key}")
