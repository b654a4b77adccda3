"""The code location: every asset, resource, check, job, schedule and sensor of the SRC pipeline."""

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from . import assets, loop_assets
from .automation import foundation_job, iteration_job, iteration_schedule, new_data_job, new_source_data_sensor
from .executors import executor_from_env
from .loop_assets import iteration_partitions
from .resources import IterationLeaseResource, SettingsResource, StoreIOManager, StoreResource, StoreRunLeaseResource
from .step_log import step_lines
from .versions import with_code_versions

# Code versions under the environment's settings (SRC_PROFILE): what `dg dev` materializes with.
all_assets = with_code_versions(load_assets_from_modules([assets, loop_assets]), SettingsResource().config())


def split_by_iteration(assets_defs: list) -> tuple[list, list]:
    """(the foundation, the iteration's assets): the iteration's are those partitioned by iteration."""
    iteration = [a for a in assets_defs if a.partitions_def == iteration_partitions]
    return [a for a in assets_defs if a not in iteration], iteration


foundation_assets, iteration_assets = split_by_iteration(all_assets)
# Checks defined apart from their asset's function (those inside it travel with the asset).
all_checks = load_asset_checks_from_modules([assets, loop_assets])


def build_resources(store: StoreResource | None = None, settings: SettingsResource | None = None) -> dict:
    """The resources of a run. With no arguments, the store and settings are configured at launch (run config),
    their defaults from the environment; the IO manager and the leases are bound to the one ``store``, so a run's
    config for ``store`` is where all of them write."""
    store = store or StoreResource.configure_at_launch()
    io_manager = StoreIOManager(store=store, run_lease=StoreRunLeaseResource(store=store))
    return {
        "store": store,
        "io_manager": io_manager,
        "settings": settings or SettingsResource.configure_at_launch(),
        "iteration_lease": IterationLeaseResource(store=store),
    }


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
