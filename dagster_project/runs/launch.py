"""How ``src-calibrate run`` starts its runs: as runs of the code location's jobs, executed here or queued.

A run is created for one of the code location's jobs (``src_foundation``, ``src_iteration``), with its origin in the
code location that ``workspace.yaml`` loads, and its store and settings in its run config. So the UI lists it
under its job, and "Re-execute" runs it again with the same store and settings.

- ``execute``: the run goes in this process at once (the job's assets carry this run's code versions), holding
  concurrency pools like any other run;
- ``submit``: the run goes through the instance's run queue, where ``deploy/dagster.yaml``'s limits apply, and a
  ``dagster-daemon`` launches it in a process of its own; this process waits and prints its steps as they end.

Either way the outcome is read back from the instance's event log (``RunOutcome``).

This module is where the command line uses Dagster's internals (``dagster._core``, ``dagster._utils``), and the
only one besides ``executors.py`` (which builds its executors from Dagster's own in-process and multiprocess
ones). Dagster's public API runs a job (``materialize``, ``execute_job``) as a run of an ad-hoc job, with no code
location origin; a run that the UI lists under its job and can re-execute needs the origin set at creation, a
run executed from an existing run record, resolving jobs against a given instance's definitions state, and
knowing whether Dagster has captured an interrupt it has not raised yet.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from ..tags import PARTITION_TAG

LOCATION = "dagster_project.definitions"  # workspace.yaml loads this module; its location takes the module's name
REPOSITORY = "__repository__"  # a Definitions object's repository name
ROOT = Path(__file__).resolve().parents[2]
_ENDED = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


def origins(job_name: str):
    """The job's origin in the code location (what the UI and the daemon load it from)."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.origin import JobPythonOrigin
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    target = LoadableTargetOrigin(executable_path=sys.executable, module_name=LOCATION, working_directory=str(ROOT))
    location = ManagedGrpcPythonEnvCodeLocationOrigin(target, LOCATION)
    remote = RemoteJobOrigin(RemoteRepositoryOrigin(location, REPOSITORY), job_name)
    python = ReconstructableRepository.for_module(LOCATION, "defs", str(ROOT)).get_python_origin()
    return remote, JobPythonOrigin(job_name, python)


def run_config(store, settings, loggers: dict | None = None, executor: str = "in_process") -> dict:
    """The run's store, settings and executor mode as run config, so that a re-execution from the UI uses them
    again."""
    config = {
        "resources": {
            "store": {"config": {"base_uri": store.base_uri, "s3_endpoint_url": store.s3_endpoint_url}},
            "settings": {"config": settings.run_config()},
        }
    }
    if loggers is not None:
        config["loggers"] = loggers
    if executor == "multiprocess":
        config["execution"] = {"config": {"multiprocess": {}}}
    return config


def reconstructable_job(job_name: str):
    """The code location's job, loaded from its module: what a step in another process loads too."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    return ReconstructableRepository.for_module(LOCATION, "defs", str(ROOT)).get_reconstructable_job(job_name)


@dataclass
class RunOutcome:
    """A finished run, as the instance recorded it."""

    run_id: str
    status: DagsterRunStatus
    all_events: list  # DagsterEvents, in order

    @property
    def success(self) -> bool:
        return self.status == DagsterRunStatus.SUCCESS

    def get_asset_materialization_events(self) -> list:
        return [e for e in self.all_events if e.event_type == DagsterEventType.ASSET_MATERIALIZATION]

    def get_asset_check_evaluations(self) -> list:
        return [
            e.event_specific_data for e in self.all_events if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION
        ]

    @classmethod
    def read(cls, instance: DagsterInstance, run_id: str) -> "RunOutcome":
        events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event is not None]
        return cls(run_id, instance.get_run_by_id(run_id).status, events)


def _create(instance, job_def, config: dict, tags: dict, partition_key: str | None):
    remote, python = origins(job_def.name)
    tags = {**job_def.tags, **tags, **({PARTITION_TAG: partition_key} if partition_key else {})}
    return instance.create_run_for_job(
        job_def, run_config=config, tags=tags, remote_job_origin=remote, job_code_origin=python
    )


def execute(instance, job, config: dict, tags: dict, partition_key: str | None = None) -> RunOutcome:
    """Creates the run and executes it from this process: ``job`` is a job definition (run here), or a
    reconstructable job (``reconstructable_job``: its steps may run in other processes)."""
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.definitions.reconstruct import ReconstructableJob
    from dagster._core.execution.api import execute_run

    reconstructable = isinstance(job, ReconstructableJob)
    run = _create(instance, job.get_definition() if reconstructable else job, config, tags, partition_key)
    execute_run(job if reconstructable else InMemoryJob(job), run, instance)
    return RunOutcome.read(instance, run.run_id)


class NoDaemon(RuntimeError):
    """``--submit`` with no live daemon: the run would wait in the queue for ever."""


def queue_daemon_alive(instance, max_age_s: float = 60.0) -> bool:
    beat = instance.get_daemon_heartbeats().get("QUEUED_RUN_COORDINATOR")
    return beat is not None and time.time() - beat.timestamp < max_age_s


def submit(instance, job_def, config: dict, tags: dict, partition_key: str | None = None, log=print) -> RunOutcome:
    """Creates the run, puts it in the run queue, and waits for the daemon to launch and finish it; each step is
    printed as it ends."""
    if not queue_daemon_alive(instance):
        raise NoDaemon(
            f"--submit queues runs for a dagster-daemon, and none is running for {instance.root_directory}: start "
            f"one (DAGSTER_HOME={instance.root_directory} dagster-daemon run -w workspace.yaml), or run without --submit"
        )
    run = _create(instance, job_def, config, tags, partition_key)
    instance.submit_run(run.run_id, workspace=None)
    log(f"  run {run.run_id[:8]} queued; the daemon launches it when dagster.yaml's limits allow")
    cursor, started = None, False
    while True:
        status = instance.get_run_by_id(run.run_id).status
        connection = instance.get_records_for_run(run.run_id, cursor=cursor)
        cursor = connection.cursor
        for record in connection.records:
            event = record.event_log_entry.dagster_event
            if event is None:
                continue
            if event.event_type == DagsterEventType.RUN_START and not started:
                started = True
                log(f"  run {run.run_id[:8]} started")
            elif event.event_type == DagsterEventType.STEP_SUCCESS:
                log(f"  {event.step_key:<22} {event.event_specific_data.duration_ms / 1000:7.1f} s")
            elif event.event_type == DagsterEventType.STEP_FAILURE:
                log(f"  {event.step_key:<22} failed")
        if status in _ENDED and not connection.has_more:
            return RunOutcome.read(instance, run.run_id)
        time.sleep(0.5)


def resolve_jobs(defs, jobs, instance) -> dict:
    """``jobs`` resolved from ``defs`` against ``instance``'s definitions state: a test process may hold a disposed
    instance's storage as the current one, so this instance's is named explicitly."""
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(instance.defs_state_storage):
        return {job.name: defs.resolve_job_def(job.name) for job in jobs}


def interrupt_captured() -> bool:
    """Whether Dagster has captured a SIGINT or SIGTERM that it has not raised inside a step yet."""
    from dagster._utils.interrupts import check_captured_interrupt

    return check_captured_interrupt()
