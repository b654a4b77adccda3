"""The code location: every asset, resource, check, job, schedule and sensor of the SRC pipeline."""

from dagster import Definitions, load_assets_from_modules

from . import assets
from .resources import SettingsResource, StoreIOManager, StoreResource

all_assets = load_assets_from_modules([assets])


def build_resources(store: StoreResource | None = None, settings: SettingsResource | None = None) -> dict:
    """The resources of a run; with no arguments, the store and profile come from the environment."""
    store = store or StoreResource()
    return {"store": store, "io_manager": StoreIOManager(store=store), "settings": settings or SettingsResource()}


defs = Definitions(assets=all_assets, resources=build_resources())
