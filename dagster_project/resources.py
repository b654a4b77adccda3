"""Resources: where artefacts live (the store), how tables travel (the IO manager), and the run settings."""

import contextlib
import os
from typing import Any, Optional

import polars as pl
from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    Failure,
    InitResourceContext,
    InputContext,
    OutputContext,
)
from pydantic import Field

from src_assets.config import TINY, SRCConfig, profile
from src_assets.storage import DEFAULT_STORE, ENDPOINT_ENV, LEASE_TTL_S, STORE_ENV, LeaseHeld, Store

from . import store_layout


class StoreResource(ConfigurableResource):
    """The base URI of every artefact: a local directory, or s3://bucket/prefix (credentials from the environment)."""

    base_uri: str = Field(default_factory=lambda: os.environ.get(STORE_ENV, DEFAULT_STORE))
    s3_endpoint_url: str = Field(
        default_factory=lambda: os.environ.get(ENDPOINT_ENV, ""),
        description="For S3-compatible stores (MinIO, Ceph, R2...); empty for AWS S3.",
    )

    def store(self) -> Store:
        return Store(self.base_uri, self.s3_endpoint_url or None)


PARTITION_TAG = "dagster/partition"


class IterationLeaseResource(ConfigurableResource):
    """One writer per iteration. A run of iteration k holds the store's lease ``leases/iteration/<k>.json`` from
    the start of its first iteration step to the end of its last; a second run of k, from this Dagster instance
    or another one sharing the store, fails before it writes anything, naming the run that holds it. A run
    killed with ``kill -9`` stops its heartbeat: its lease is taken over at once on the same host (its process
    is gone) and after ``ttl_s`` seconds from any other."""

    store: StoreResource
    ttl_s: float = LEASE_TTL_S

    @contextlib.contextmanager
    def yield_for_execution(self, context: InitResourceContext):
        run = context.run
        key = run.tags.get(PARTITION_TAG) if run is not None else None
        if key is None:  # not a run of one iteration (e.g. a direct call in a test): nothing to guard
            yield self
            return
        try:
            lease = self.store.store().acquire_lease(
                store_layout.iteration_lease(key), run.run_id, self.ttl_s, job=run.job_name
            )
        except LeaseHeld as e:
            raise Failure(
                f"iteration {key} is being written by another run, so this run writes nothing: its lease {e}. "
                f"Wait for that run to end; a dead run's lease is taken over once its heartbeat is "
                f"{self.ttl_s:.0f} s old"
            ) from e
        try:
            yield self
        finally:
            lease.release()


STORE_LEASE_OWNER_TAG = "src/store_lease_owner"  # a command that holds the store's lease runs its runs under it


class StoreRunLeaseResource(ConfigurableResource):
    """One run at a time writes a store. A run that materializes assets holds the store's lease
    ``leases/store_run.json`` from its start to its end (the IO manager, which writes every asset, needs this
    resource), so no other run rewrites the source table, eval set, SFT checkpoint or R-Scorer while this run's
    steps read them, whether the runs come from the UI, a sensor, a schedule or ``src-calibrate``. A second run
    fails before any step, naming the run that holds the store. A run tagged ``src/store_lease_owner`` belongs
    to a command that holds the lease already (``src-calibrate run``), and runs under it."""

    store: StoreResource
    ttl_s: float = LEASE_TTL_S

    @contextlib.contextmanager
    def yield_for_execution(self, context: InitResourceContext):
        run = context.run
        if run is None:  # a sensor's or a test's direct use: no run to guard
            yield self
            return
        owner = run.tags.get(STORE_LEASE_OWNER_TAG, run.run_id)
        try:
            lease = self.store.store().acquire_lease(
                store_layout.STORE_RUN_LEASE, owner, self.ttl_s, job=run.job_name, run=run.run_id
            )
        except LeaseHeld as e:
            raise Failure(
                f"another run is using this store, so this run writes nothing: {e}. Wait for it to end; a "
                f"dead run's lease is taken over once its heartbeat is {self.ttl_s:.0f} s old"
            ) from e
        try:
            yield self
        finally:
            lease.release()


class SettingsResource(ConfigurableResource):
    """A named profile plus overrides; see ``src_assets.config.SRCConfig`` for every setting."""

    profile: str = Field(default_factory=lambda: os.environ.get("SRC_PROFILE", "default"))
    seed: int = 0
    policy_model: str = Field(default=TINY, description="'tiny', a local model directory, or a hub id")
    scorer_model: str = Field(default=TINY, description="'tiny', a local model directory, or a hub id")
    # What matters on a GPU, as typed Launchpad fields; None keeps the profile's value.
    device: Optional[str] = Field(default=None, description="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'...")
    dtype: Optional[str] = Field(
        default=None, description="'auto' (bfloat16 on a GPU that supports it), float32, bfloat16, float16"
    )
    attn_implementation: Optional[str] = Field(
        default=None, description="'' (transformers' choice), sdpa, flash_attention_2, eager"
    )
    lora_r: Optional[int] = Field(default=None, description="0: full fine-tuning; > 0: LoRA of this rank")
    gradient_accumulation_steps: Optional[int] = None
    gradient_checkpointing: Optional[bool] = None
    max_length: Optional[int] = Field(default=None, description="> 0: truncate training examples to this many tokens")
    report_to: Optional[str] = Field(default=None, description="comma-separated: tensorboard, wandb, mlflow")
    image_min_pixels: Optional[int] = None
    image_max_pixels: Optional[int] = None
    eval_max_new_tokens: Optional[int] = None
    judge_batch_size: Optional[int] = None
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="any other SRCConfig field, e.g. {'tau': 0.2, 'n_sft': 500}"
    )

    def config(self) -> SRCConfig:
        typed = {name: getattr(self, name) for name in _TYPED_OPTIONAL if getattr(self, name) is not None}
        # Overrides win over the typed fields, so ``--set policy_model=DIR`` and ``--set seed=3`` work too.
        return profile(
            self.profile,
            **{
                "seed": self.seed,
                "policy_model": self.policy_model,
                "scorer_model": self.scorer_model,
                **typed,
                **self.overrides,
            },
        )


_TYPED_OPTIONAL = (
    "device",
    "dtype",
    "attn_implementation",
    "lora_r",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "max_length",
    "report_to",
    "image_min_pixels",
    "image_max_pixels",
    "eval_max_new_tokens",
    "judge_batch_size",
)


class StoreIOManager(ConfigurableIOManager):
    """Polars tables as Parquet and everything else as JSON, at ``assets/<asset>[/<partition>]`` in the store;
    a run writes through it only while it holds the store (``run_lease``)."""

    store: StoreResource
    run_lease: StoreRunLeaseResource

    def _key(self, context: InputContext | OutputContext) -> str:
        partition = context.asset_partition_key if context.has_asset_partitions else None
        return store_layout.asset_value("/".join(context.asset_key.path), partition)

    def handle_output(self, context: OutputContext, obj) -> None:
        store = self.store.store()
        key = self._key(context)
        if isinstance(obj, pl.DataFrame):
            uri = store.write_table(f"{key}.parquet", obj)
        else:
            uri = store.write_json(f"{key}.json", obj)
        context.add_output_metadata({"stored_at": uri})

    def load_input(self, context: InputContext):
        store = self.store.store()
        key = self._key(context)
        if store.exists(f"{key}.parquet"):
            return store.read_table(f"{key}.parquet")
        return store.read_json(f"{key}.json")
