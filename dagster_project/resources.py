"""Resources: where artefacts live (the store), how tables travel (the IO manager), and the run settings."""


import os
from typing import Any

import polars as pl
from dagster import ConfigurableIOManager, ConfigurableResource, InputContext, OutputContext
from pydantic import Field

from src_assets.config import SRCConfig, TINY, profile
from src_assets.storage import DEFAULT_STORE, ENDPOINT_ENV, STORE_ENV, Store


class StoreResource(ConfigurableResource):
    """The base URI of every artefact: a local directory, or s3://bucket/prefix (credentials from the environment)."""

    base_uri: str = Field(default_factory=lambda: os.environ.get(STORE_ENV, DEFAULT_STORE))
    s3_endpoint_url: str = Field(
        default_factory=lambda: os.environ.get(ENDPOINT_ENV, ""),
        description="For S3-compatible stores (MinIO, Ceph, R2...); empty for AWS S3.",
    )

    def store(self) -> Store:
        return Store(self.base_uri, self.s3_endpoint_url or None)


class SettingsResource(ConfigurableResource):
    """A named profile plus overrides; see ``src_assets.config.SRCConfig`` for every setting."""

    profile: str = Field(default_factory=lambda: os.environ.get("SRC_PROFILE", "default"))
    seed: int = 0
    policy_model: str = Field(default=TINY, description="'tiny', a local model directory, or a hub id")
    scorer_model: str = Field(default=TINY, description="'tiny', a local model directory, or a hub id")
    overrides: dict[str, Any] = Field(default_factory=dict, description="any SRCConfig field, e.g. {'tau': 0.2, 'n_sft': 500}")

    def config(self) -> SRCConfig:
        # Overrides win over the typed fields, so ``--set policy_model=DIR`` and ``--set seed=3`` work too.
        return profile(self.profile, **{"seed": self.seed, "policy_model": self.policy_model,
                                        "scorer_model": self.scorer_model, **self.overrides})


class StoreIOManager(ConfigurableIOManager):
    """Polars tables as Parquet and everything else as JSON, at ``assets/<asset>[/<partition>]`` in the store."""

    store: StoreResource

    def _key(self, context: InputContext | OutputContext) -> str:
        key = "assets/" + "/".join(context.asset_key.path)
        if context.has_asset_partitions:
            key += f"/{context.asset_partition_key}"
        return key

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
