"""The executor of the Definitions, chosen by the environment, and the leases it holds for a whole run.

``SRC_EXECUTOR`` picks it, with no code edit:

- ``local`` (default): in one process, or in one process per step where a run's config says
  ``execution: {config: {multiprocess: {}}}`` (``src-calibrate run --executor multiprocess`` does);
- ``k8s``: ``dagster-k8s``'s ``k8s_job_executor``, a pod per step (``deploy/``);
- ``celery``: ``dagster-celery``'s ``celery_executor``, a worker queue per step.

Whatever runs the steps, the run's orchestrating process (the one process of an in-process run, the parent of a
multiprocess run, the run worker of a Kubernetes run) holds the store's run lease and, for an iteration, the
iteration's lease from the first step to the last: one writer per iteration and per store, even where steps run
in other processes or on other hosts. Each step's own lease resources re-enter the run's leases as the same owner.
"""

from __future__ import annotations

import os

from dagster import Executor, ExecutorDefinition, Failure, Field, Selector, executor
from dagster._core.definitions.executor_definition import (
    IN_PROC_CONFIG,
    MULTI_PROC_CONFIG,
    _core_in_process_executor_creation,
    _core_multiprocess_executor_creation,
    multiple_process_executor_requirements,
)

from src_assets.leases import LeaseHeld, acquire_lease

from . import store_layout
from .tags import PARTITION_TAG

EXECUTOR_ENV = "SRC_EXECUTOR"
EXECUTORS = ("local", "k8s", "celery")


class _HoldingLeases(Executor):
    """``inner``, with the run's leases held around its whole execution."""

    def __init__(self, inner: Executor):
        self.inner = inner

    @property
    def retries(self):
        return self.inner.retries

    @property
    def step_dependency_config(self):
        return self.inner.step_dependency_config

    def execute(self, plan_context, execution_plan):
        from .resources import StoreResource
        from .tags import STORE_LEASE_OWNER_TAG

        run = plan_context.dagster_run
        config = ((run.run_config or {}).get("resources", {}).get("store") or {}).get("config") or {}
        store = StoreResource(**config).store()
        owner = run.tags.get(STORE_LEASE_OWNER_TAG, run.run_id)
        held = []
        try:
            held.append(acquire_lease(store, store_layout.STORE_RUN_LEASE, owner, job=run.job_name, run=run.run_id))
            if run.tags.get(PARTITION_TAG) is not None:
                key = run.tags[PARTITION_TAG]
                held.append(acquire_lease(store, store_layout.iteration_lease(key), run.run_id, job=run.job_name))
        except LeaseHeld as e:
            for lease in held:
                lease.release()
            raise Failure(f"another run is writing, so this run writes nothing: {e}") from e
        try:
            yield from self.inner.execute(plan_context, execution_plan)
        finally:
            for lease in reversed(held):
                lease.release()


@executor(
    name="src_local_executor",
    config_schema=Field(
        Selector({"in_process": IN_PROC_CONFIG, "multiprocess": MULTI_PROC_CONFIG}),
        default_value={"in_process": {}},
    ),
    requirements=lambda config: multiple_process_executor_requirements() if "multiprocess" in config else [],
)
def local_executor(init_context) -> Executor:
    """In one process (default: model steps share one device, and a Python start-up per step costs more than it
    saves), or one process per step with ``multiprocess`` in the run config, for sharded steps."""
    config = init_context.executor_config
    if "multiprocess" in config:
        return _HoldingLeases(_core_multiprocess_executor_creation(config["multiprocess"]))
    return _HoldingLeases(_core_in_process_executor_creation(config["in_process"]))


def _holding_leases(inner: ExecutorDefinition) -> ExecutorDefinition:
    return ExecutorDefinition(
        name=inner.name,
        config_schema=inner.config_schema,
        requirements=inner.get_requirements,
        executor_creation_fn=lambda init_context: _HoldingLeases(inner.executor_creation_fn(init_context)),
        description=inner.description,
    )


def executor_from_env() -> ExecutorDefinition:
    """The executor ``SRC_EXECUTOR`` names; a clear error for an unknown name or a missing package."""
    name = os.environ.get(EXECUTOR_ENV, "local").strip() or "local"
    if name not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={name!r} is not one of {EXECUTORS}")
    if name == "local":
        return local_executor
    try:
        if name == "k8s":
            from dagster_k8s import k8s_job_executor

            return _holding_leases(k8s_job_executor)
        from dagster_celery import celery_executor

        return _holding_leases(celery_executor)
    except ImportError as e:
        package = "dagster-k8s" if name == "k8s" else "dagster-celery"
        raise ImportError(f"{EXECUTOR_ENV}={name} needs {package} (pip install {package}): {e}") from e


def shard_threads(context, pool: str) -> int | None:
    """torch threads for one shard step of a multiprocess run, or None to keep torch's default.

    The multiprocess executor runs up to min(the pool's slots, ``max_concurrent``) model steps at once on this
    machine, each a process that would otherwise take a thread per core: on 2 cores, two shards ran about 7 times
    slower than one. Each gets cores / that many threads. The share depends on the machine and the pool, never on
    the number of shards, because CPU reductions round differently with another thread count: 1 and 3 shards then
    give bit-identical tables. In-process runs shards one after another, and Kubernetes or Celery put each on a
    machine of its own, so both keep the default; so does an explicit ``OMP_NUM_THREADS``.
    """
    multiprocess = _multiprocess(context)
    if multiprocess is None or os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = os.cpu_count() or 1
    slots = context.instance.event_log_storage.get_concurrency_info(pool).limit or cores
    return max(1, cores // max(1, min(slots, multiprocess.get("max_concurrent") or cores)))


def shard_device(context, index: int) -> int | None:
    """The CUDA device for shard ``index`` of a multiprocess run on a machine with several, or None.

    Shard i takes device i mod count, so that shards running side by side do not all land on the first device (set
    ``shards`` to a multiple of the devices and the pool's slots to their number). In-process shards run one after
    another, and Kubernetes or Celery give each step a device of its own, so they keep the runtime's device.
    """
    if _multiprocess(context) is None:
        return None
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return index % count if count > 1 else None


def _multiprocess(context) -> dict | None:
    """The multiprocess executor's config where the run's steps run in processes of this machine."""
    return ((context.run.run_config or {}).get("execution") or {}).get("config", {}).get("multiprocess")
