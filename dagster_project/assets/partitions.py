"""Iterations as Dagster partitions, and the pool and tags every model step runs under."""

import os

from dagster import (
    DynamicPartitionsDefinition,
    Failure,
)

from .. import store_layout

iteration_partitions = DynamicPartitionsDefinition(name="iteration")
GPU_POOL = "gpu"  # every asset that runs a model shares this concurrency pool
# On Kubernetes (SRC_EXECUTOR=k8s) each model step's pod asks for SRC_GPUS_PER_STEP GPUs (set it to
# train_processes for multi-process training); other executors ignore the tag.
GPU_STEP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": os.environ.get("SRC_GPUS_PER_STEP", "1")}}}
    }
}


def iteration_key(k: int) -> str:
    return f"{k:03d}"


def next_iteration(store) -> str:
    """The first iteration whose policy is not committed in the store: after a failed iteration it is that one
    again (retried, not skipped), and iterations stay in order."""
    k = 1
    while store.current_model(store_layout.policy_checkpoint(iteration_key(k))) is not None:
        k += 1
    return iteration_key(k)


def offer_iteration(context, k: int) -> None:
    """Adds iteration k to the iteration partitions once the policy it starts from is committed (the SFT checkpoint
    offers 1, policy k offers k + 1), so the iteration job's Launchpad and the asset pages offer it: a dynamic
    partition exists only once added. Adding one that exists changes nothing."""
    context.instance.add_dynamic_partitions(iteration_partitions.name, [iteration_key(k)])


def iteration_number(key: str) -> int:
    if not key.isdigit() or int(key) < 1:
        raise Failure(f"iteration partition keys are zero-padded positive numbers like '001', got {key!r}")
    return int(key)


ITERATION = dict(group_name="iteration", partitions_def=iteration_partitions)
