"""Resources: where artefacts live (the store), how tables travel (the IO manager), and the run settings."""

import contextlib
import hashlib
import os
import re
from dataclasses import fields
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
from pydantic import Field, create_model

from src_assets.config import SRCConfig, setting_names
from src_assets.leases import LEASE_TTL_S, LeaseHeld, acquire_lease
from src_assets.profiles import profile
from src_assets.storage import DEFAULT_STORE, ENDPOINT_ENV, STORE_ENV, Store

from . import store_layout
from .tags import PARTITION_TAG, STORE_LEASE_OWNER_TAG, STORE_TAG


class StoreResource(ConfigurableResource):
    """The base URI of every artefact: a local directory, or s3://bucket/prefix (credentials from the environment)."""

    base_uri: str = Field(
        default_factory=lambda: os.environ.get(STORE_ENV, DEFAULT_STORE),
        description="A local directory or s3://bucket/prefix ($SRC_STORE_URI, else ./.src_store).",
    )
    s3_endpoint_url: str = Field(
        default_factory=lambda: os.environ.get(ENDPOINT_ENV, ""),
        description="For S3-compatible stores (MinIO, Ceph, R2...); empty for AWS S3.",
    )

    def store(self) -> Store:
        return Store(self.base_uri, self.s3_endpoint_url or None)

    def tags(self) -> dict[str, str]:
        """The tag every materialization carries, so the UI can say (and filter by) which store it was written to.
        Runs carry the same tag with the whole URI; a materialization's tag value must be a short label, so its
        whole URI is in its metadata (``store``)."""
        return {STORE_TAG: store_label(self.base_uri)}


def store_label(uri: str) -> str:
    """A short name for a store, fit for a Dagster tag value (at most 63 characters of letters, digits, ``_.-``):
    the end of its URI, and 8 hex digits of the whole URI's digest, so two stores never share a label."""
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", uri.split("://", 1)[-1].rstrip("/")).strip("-.")
    return f"{tail[-54:].lstrip('-.')}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


class IterationLeaseResource(ConfigurableResource):
    """One writer per iteration. A run of iteration k holds the store's lease leases/iteration/<k>.json from
    the start of its first iteration step to the end of its last; a second run of k, from this Dagster instance
    or another one sharing the store, fails before it writes anything, naming the run that holds it. A run
    killed with kill -9 stops its heartbeat: its lease is taken over at once on the same host (its process
    is gone) and after ttl_s seconds from any other."""

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
            lease = acquire_lease(
                self.store.store(), store_layout.iteration_lease(key), run.run_id, self.ttl_s, job=run.job_name
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


class StoreRunLeaseResource(ConfigurableResource):
    """One run at a time writes a store. A run that materializes assets holds the store's lease
    leases/store_run.json from its start to its end (the IO manager, which writes every asset, needs this
    resource), so no other run rewrites the source table, eval set, SFT checkpoint or judge while this run's
    steps read them, whether the runs come from the UI, a sensor, a schedule or src-calibrate. A second run
    fails before any step, naming the run that holds the store. A run tagged src/store_lease_owner belongs
    to a command that holds the lease already (src-calibrate run), and runs under it."""

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
            lease = acquire_lease(
                self.store.store(), store_layout.STORE_RUN_LEASE, owner, self.ttl_s, job=run.job_name, run=run.run_id
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


class _Settings(ConfigurableResource):
    profile: str = Field(
        default_factory=lambda: os.environ.get("SRC_PROFILE", "default"),
        description="Named defaults: default (the embedded run) or smoke (tiny sizes, seconds); $SRC_PROFILE.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Settings by name, e.g. {'tau': 0.2, 'n_sft': 500}; they win over the fields."
    )

    def config(self) -> SRCConfig:
        typed = {name: getattr(self, name) for name in _SCALAR_SETTINGS if getattr(self, name) is not None}
        return profile(self.profile, **{**typed, **self.overrides})

    def run_config(self) -> dict:
        """This resource's config as a run carries it: the profile, the overrides and every typed field that is set
        (``seed`` among them), so that the run's assets read the settings this resource was made with."""
        typed = {name: getattr(self, name) for name in _SCALAR_SETTINGS if getattr(self, name) is not None}
        return {"profile": self.profile, "overrides": dict(self.overrides), **typed}


_PYTHON_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# Every scalar setting of SRCConfig, by its flat name; the one tuple (judge_quality_weights) goes through overrides.
_SCALAR_SETTINGS = {name: kind for name, (_, _, kind) in setting_names().items() if kind in _PYTHON_TYPES}


_DEFAULTS = SRCConfig()


def _help(name: str) -> str | None:
    group, attr, _ = setting_names()[name]
    owner = getattr(_DEFAULTS, group) if group else _DEFAULTS
    return next(f.metadata.get("help") for f in fields(owner) if f.name == attr) or None


# A named profile plus every setting as a typed Launchpad field (None keeps the profile's value), generated from
# SRCConfig so that no setting is declared twice.
SettingsResource = create_model(
    "SettingsResource",
    __base__=_Settings,
    __doc__="A named profile plus overrides: every setting is a field here (empty keeps the profile's value); "
    "src-calibrate settings lists them with their defaults.",
    __module__=__name__,
    **{
        name: (Optional[_PYTHON_TYPES[kind]], Field(default=None, description=_help(name)))
        for name, kind in _SCALAR_SETTINGS.items()
    },
)


class StoreIOManager(ConfigurableIOManager):
    """Polars tables as Parquet and everything else as JSON, at assets/<asset>[/<partition>] in the store;
    a run writes through it only while it holds the store (run_lease)."""

    store: StoreResource
    run_lease: StoreRunLeaseResource

    def _key(self, context: InputContext | OutputContext) -> str:
        if not context.has_asset_key:  # a step's output inside a graph (a shard's table): kept under its run
            output = context if isinstance(context, OutputContext) else context.upstream_output
            name = output.name + (f".{output.mapping_key}" if output.mapping_key else "")  # one per dynamic output
            return store_layout.step_output(output.run_id, output.step_key, name)
        partition = context.asset_partition_key if context.has_asset_partitions else None
        return store_layout.asset_value("/".join(context.asset_key.path), partition)

    def handle_output(self, context: OutputContext, obj) -> None:
        store = self.store.store()
        key = self._key(context)
        if isinstance(obj, pl.DataFrame):
            uri = store.write_table(f"{key}.parquet", obj)
        else:
            uri = store.write_json(f"{key}.json", obj)
        # The store by itself too: the UI lists one partition's materializations from every store it was written to.
        context.add_output_metadata({"stored_at": uri, "store": store.base_uri})

    def load_input(self, context: InputContext):
        store = self.store.store()
        key = self._key(context)
        if store.exists(f"{key}.parquet"):
            return store.read_table(f"{key}.parquet")
        return store.read_json(f"{key}.json")


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
