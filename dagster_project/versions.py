"""What each asset reads, declared once next to its ``@asset``, and the versions derived from it.

An asset declares the settings it reads and the ``src_assets`` modules whose code makes it::

    @asset(group_name="iteration", ...)
    @reads("judge", "aggregation", "runtime", "scoring", stages=("judge", "preference", "verifier"))
    def pairwise_scores(...): ...

A name is a flat setting name (``tau``, ``k``...), one of the stage settings groups of ``SRCConfig``
(``search``, ``judge``, ``aggregation``, ``curation``: all their fields), or a bundle (``runtime``, ``training``:
the fields every model stage or every training shares). From the declaration come:

- the asset's ``code_version``: ``code-<digest of its code and stage modules>.settings-<digest of what it
  reads>``. Dagster marks an asset stale when its code version differs from the one recorded at its last
  materialization, so changing ``tau`` marks ``preference_set`` (and what follows it) stale and nothing upstream;
- the reuse fingerprint of a trained model (``reuse_digest``): a model trained earlier from the same inputs, the
  same code and the same declared settings is reused rather than retrained.

"Its code" is traced, not trusted: the asset's function, every ``dagster_project`` function, class or op its body
names (followed through their bodies in turn), and the declared stage modules with every ``src_assets`` and
``kernels`` module they import, anywhere in their source. A body that names a ``src_assets`` or ``kernels`` module
(or something defined in one) that the declared stages do not import is an error as the definitions load, so the
declaration cannot miss a module the asset runs. Sources are compared as syntax trees: an edit to a comment or to
the layout changes no version. ``storage`` and ``progress`` move bytes and report progress, and change nothing an
asset computes, so they need no declaration and are not part of any version.

The Definitions carry the versions of the settings in the environment (``SRC_PROFILE``, what ``dg dev``
materializes with); ``src-calibrate run`` stamps its own settings on the assets it runs.
"""

import ast
import importlib
import importlib.util
import inspect
import sys
import textwrap
import types
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from src_assets.config import SETTING_BUNDLES, SETTING_GROUPS, SRCConfig, setting_names
from src_assets.fingerprints import digest

_ROOT = Path(__file__).resolve().parents[1]
_METHOD_PACKAGES = ("src_assets", "kernels")  # the method's code: what versions follow
_NOT_VERSIONED = ("src_assets.storage", "src_assets.progress")  # bytes and progress, never what is computed


@dataclass(frozen=True)
class Reads:
    settings: tuple[str, ...]
    stages: tuple[str, ...]
    function: types.FunctionType | None = None  # the decorated function: where tracing its code starts


READS: dict[str, Reads] = {}  # asset name -> what it reads, filled by @reads as the asset modules are imported


def reads(*settings: str, stages: tuple[str, ...] = ()):
    """Declares what the asset defined by the decorated function reads (see the module docstring)."""
    for name in settings:
        if name not in SETTING_GROUPS and name not in SETTING_BUNDLES and name not in setting_names():
            raise ValueError(f"@reads names {name!r}, which is no setting, settings group or bundle")
    for module in stages:
        if _module_file(_stage_module(module)) is None:
            raise ValueError(f"@reads names the stage module {module!r}, which src_assets and kernels do not have")

    def declare(fn):
        READS[fn.__name__] = Reads(tuple(settings), tuple(stages), fn)
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


def _stage_module(name: str) -> str:
    """A stage as @reads names it (``weighted_dpo``, or ``kernels.dpo``) as a module name."""
    return name if name.split(".")[0] in _METHOD_PACKAGES else f"src_assets.{name}"


def _module_file(module: str) -> Path | None:
    path = _ROOT.joinpath(*module.split("."))
    for file in (path.with_suffix(".py"), path / "__init__.py"):
        if file.is_file():
            return file
    return None


def _tree(source: str) -> str:
    """Source as its syntax tree: comments and layout do not count."""
    return ast.dump(ast.parse(textwrap.dedent(source)))


def _import_base(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` statement imports from, a relative one resolved against ``package``."""
    return importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    """The modules of the method's packages that the import statements anywhere in ``tree`` name (a function's
    imports included), ``package`` resolving relative ones."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _import_base(node, package)
            # ``from src_assets import scenes`` names a module; ``from .scenes import X`` names one through its base.
            candidates = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        found |= {m for m in candidates if m.split(".")[0] in _METHOD_PACKAGES and _module_file(m) is not None}
    return found


@cache
def _module_closure(module: str) -> frozenset[str]:
    """``module`` and every method module it imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        file = _module_file(m)
        todo += _imported_modules(
            ast.parse(file.read_text()), m if file.name == "__init__.py" else m.rpartition(".")[0]
        )
    return frozenset(seen)


def _traced(functions) -> tuple[list[str], set[str]]:
    """The syntax trees of ``functions`` and of every ``dagster_project`` function, class or op their bodies name
    (followed in turn), and the method modules those bodies name (a module, or a function or class defined in one).
    Only bodies count: a parameter's annotation (``store: StoreResource``) is not code the asset runs."""
    trees, modules, seen, todo = [], set(), set(), list(functions)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
        trees.append(ast.dump(tree))
        body = tree.body[0].body  # the function's or class's own statements
        scope = vars(sys.modules[obj.__module__])
        package = obj.__module__.rpartition(".")[0]
        names = {n.id for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        referenced = [scope[n] for n in sorted(names) if n in scope]
        for stmt in body:
            for node in ast.walk(stmt):
                if isinstance(node, ast.ImportFrom):  # a function's own imports: what each imported name is
                    base = importlib.import_module(_import_base(node, package))
                    referenced += [getattr(base, a.name, None) for a in node.names]
                    modules |= _imported_modules(node, package)
        for ref in referenced:
            op_fn = getattr(getattr(ref, "compute_fn", None), "decorated_fn", None)  # an @op's function
            owner = ref.__name__ if inspect.ismodule(ref) else getattr(ref, "__module__", None) or ""
            if op_fn is not None:
                todo.append(op_fn)
            elif owner.split(".")[0] in _METHOD_PACKAGES and _module_file(owner) is not None:
                modules.add(owner)
            elif owner.startswith("dagster_project.") and (inspect.isfunction(ref) or inspect.isclass(ref)):
                todo.append(ref)
    return sorted(trees), modules - set(_NOT_VERSIONED)  # sorted: the order of a walk is no part of the code


@cache  # sources do not change under a running process
def code_digest(name: str) -> str:
    """The digest of the code that asset ``name`` runs, traced from the function its @reads decorates (see the
    module docstring). Raises when that code names a method module that its declared stages do not import."""
    if name not in READS:
        raise KeyError(f"asset {name!r} declares nothing it reads; put @reads(...) under its @asset")
    declared = set().union(*(_module_closure(_stage_module(m)) for m in READS[name].stages))
    trees, named = _traced([READS[name].function])
    undeclared = named - declared
    if undeclared:
        raise ValueError(
            f"asset {name!r} runs {', '.join(sorted(undeclared))} without declaring it: add it to the stages of "
            f"its @reads"
        )
    modules = sorted(declared - set(_NOT_VERSIONED))
    return digest(*trees, *(_tree(_module_file(m).read_text()) for m in modules))


def reuse_digest(name: str, cfg: SRCConfig) -> str:
    """What a model's reuse is keyed by, besides its inputs: the code that trains it and the settings it reads."""
    return digest(code_digest(name), settings_digest(name, cfg))


def code_version(asset, cfg: SRCConfig) -> str:
    """``asset``'s version under ``cfg``: the code it runs, then its settings."""
    name = asset.key.to_user_string()
    return f"code-{code_digest(name)[:8]}.settings-{settings_digest(name, cfg)[:8]}"


def with_code_versions(assets: list, cfg: SRCConfig) -> list:
    """The asset definitions, each carrying its code version under ``cfg``."""
    return [
        a.map_asset_specs(lambda spec, a=a: spec.replace_attributes(code_version=code_version(a, cfg))) for a in assets
    ]
