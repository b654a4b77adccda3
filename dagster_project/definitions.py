"""The code location: every asset, resource, check, job, schedule and sensor of the SRC pipeline."""

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from .assets import base_models, data, evaluation, iteration, models, sharded
from .assets.partitions import iteration_partitions
from .automation import foundation_job, iteration_job, iteration_schedule, new_data_job, new_source_data_sensor
from .executors import executor_from_env
from .resources import SettingsResource, build_resources
from .runs.step_log import step_lines
from .versions import with_code_versions

ASSET_MODULES = [data, base_models, models, evaluation, iteration, sharded]

# Code versions under the environment's settings (SRC_PROFILE): what `dg dev` materializes with.
all_assets = with_code_versions(load_assets_from_modules(ASSET_MODULES), SettingsResource().config())


def split_by_iteration(assets_defs: list) -> tuple[list, list]:
    """(the foundation, the iteration's assets): the iteration's are those partitioned by iteration."""
    iteration = [a for a in assets_defs if a.partitions_def == iteration_partitions]
    return [a for a in assets_defs if a not in iteration], iteration


foundation_assets, iteration_assets = split_by_iteration(all_assets)
# Checks defined apart from their asset's function (those inside it travel with the asset).
all_checks = load_asset_checks_from_modules(ASSET_MODULES)


defs = Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[foundation_job, iteration_job, new_data_job],
    schedules=[iteration_schedule],
    sensors=[new_source_data_sensor],
    resources=build_resources(),
    # src-calibrate's runs log through this one (one line per finished step), by their run config.
    loggers={"step_lines": step_lines()},
    # SRC_EXECUTOR picks in-process or multiprocess (per run), Kubernetes or Celery, with no code edit
    # (dagster_project/executors.py); whichever it is holds the run's leases from its first step to its last.
    executor=executor_from_env(),
)
