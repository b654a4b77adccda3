"""What each asset reads, declared once next to its ``@asset``, and the versions derived from it.

An asset declares the settings it reads and the ``src_assets`` modules whose code makes it::

    @asset(group_name="iteration", ...)
    @reads("judge", "aggregation", "runtime", "scoring", stages=("r_scorer", "preference", "verifier"))
    def pairwise_scores(...): ...

A name is a flat setting name (``tau``, ``k``...), one of the stage settings groups of ``SRCConfig``
(``search``, ``judge``, ``aggregation``, ``curation``: all their fields), or a bundle (``runtime``, ``training``:
the fields every model stage or every training shares). From the declaration come:

- the asset's ``code_version``: ``code-<digest of its code and stage modules>.settings-<digest of what it
  reads>``. Dagster marks an asset stale when its code version differs from the one recorded at its last
  materialization, so changing ``tau`` marks ``preference_set`` (and what follows it) stale and nothing upstream;
- the reuse fingerprint of a trained model (``settings_digest``): a model trained earlier from the same inputs
  and the same declared settings is reused rather than retrained.

The Definitions carry the versions of the settings in the environment (``SRC_PROFILE``, what ``dagster dev``
materializes with); ``src-calibrate run`` stamps its own settings on the assets it runs.
"""

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

from src_assets.config import SETTING_BUNDLES, SETTING_GROUPS, SRCConfig, setting_names
from src_assets.fingerprints import digest

_SRC = Path(__file__).resolve().parents[1] / "src_assets"


@dataclass(frozen=True)
class Reads:
    settings: tuple[str, ...]
    stages: tuple[str, ...]


READS: dict[str, Reads] = {}  # asset name -> what it reads, filled by @reads as the asset modules are imported


def reads(*settings: str, stages: tuple[str, ...] = ()):
    """Declares what the asset defined by the decorated function reads (see the module docstring)."""
    for name in settings:
        if name not in SETTING_GROUPS and name not in SETTING_BUNDLES and name not in setting_names():
            raise ValueError(f"@reads names {name!r}, which is no setting, settings group or bundle")
    for module in stages:
        if not (_SRC / f"{module}.py").is_file():
            raise ValueError(f"@reads names the stage module {module!r}, which src_assets does not have")

    def declare(fn):
        READS[fn.__name__] = Reads(tuple(settings), tuple(stages))
        return fn

    return declare


def settings_read(asset: str, cfg: SRCConfig) -> dict:
    """The values of the settings ``asset`` declares it reads."""
    if asset not in READS:
        raise KeyError(f"asset {asset!r} declares no settings; put @reads(...) under its @asset")
    out = {}
    for name in READS[asset].settings:
        if name in SETTING_GROUPS:
            out[name] = asdict(getattr(cfg, name))
        else:
            out.update({n: cfg.setting(n) for n in SETTING_BUNDLES.get(name, (name,))})
    return out


def settings_digest(asset: str, cfg: SRCConfig) -> str:
    return digest(settings_read(asset, cfg))


def asset_functions(asset) -> list:
    """The Python functions that compute ``asset``: its own, or each op's of a graph-backed asset."""
    from dagster import GraphDefinition

    node = asset.node_def
    ops = node.node_defs if isinstance(node, GraphDefinition) else [node]
    return [op.compute_fn.decorated_fn for op in ops]


def code_version(asset, cfg: SRCConfig) -> str:
    """``asset``'s version under ``cfg``: its own function's source and its stage modules', then its settings."""
    name = asset.key.to_user_string()
    if name not in READS:
        raise KeyError(f"asset {name!r} declares nothing it reads; put @reads(...) under its @asset")
    sources = [inspect.getsource(fn) for fn in asset_functions(asset)]
    sources += [(_SRC / f"{m}.py").read_text() for m in READS[name].stages]
    return f"code-{digest(*sources)[:8]}.settings-{settings_digest(name, cfg)[:8]}"


def with_code_versions(assets: list, cfg: SRCConfig) -> list:
    """The asset definitions, each carrying its code version under ``cfg``."""
    return [
        a.map_asset_specs(lambda spec, a=a: spec.replace_attributes(code_version=code_version(a, cfg))) for a in assets
    ]
