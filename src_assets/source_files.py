"""Which of the user's files are sources, and how each is read: the store's source prefix, and hub datasets.

Under ``source_prefix``, a folder written by ``datasets``' ``save_to_disk`` (it holds ``state.json`` or
``dataset_dict.json``) is one source; every other ``.parquet``, ``.json`` and ``.jsonl`` file is one source.
An image path in a JSON record or a Parquet struct is read relative to its file, inside the store.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from .source_data import (
    SourceDataError,
    SourceOptions,
    parse_source_columns,
    parse_split_fractions,
    quoted,
)
from .source_datasets import read_dataset_source
from .source_json import read_json_source
from .source_parquet import read_parquet_source
from .storage import Store, StoreError

FILE_SUFFIXES = (".parquet", ".json", ".jsonl")
DATASET_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes into a Dataset(Dict) folder


def source_options(cfg) -> SourceOptions:
    return SourceOptions(
        columns=parse_source_columns(cfg.source_columns),
        split_fractions=parse_split_fractions(cfg.split_fractions),
        max_bytes=cfg.max_source_file_bytes,
        max_image_pixels=cfg.max_image_pixels,
        max_text_chars=cfg.max_text_chars,
    )


@dataclass(frozen=True)
class UserSource:
    """One source: a file or ``datasets`` folder in the store (``key``), or a hub dataset id (``hub_id``)."""

    store: Store
    kind: str  # "parquet", "json", "dataset" or "hub"
    key: str = ""
    hub_id: str = ""

    @property
    def name(self) -> str:
        return self.hub_id if self.kind == "hub" else self.store.uri(self.key)

    def read(self, options: SourceOptions) -> pl.DataFrame:
        if self.kind == "hub":
            return read_dataset_source(_load_hub_dataset(self.hub_id), self.hub_id, options)
        if self.kind == "dataset":
            return read_dataset_source(_load_dataset_folder(self.store, self.key), self.name, options)
        size = self.store.size(self.key)
        if size > options.max_bytes:
            raise SourceDataError(
                f"{self.name}: the file is {size} bytes, over the cap of {options.max_bytes} (max_source_file_bytes)"
            )
        resolve = _relative_images(self.store, self.key, options.max_bytes)
        with self.store.open(self.key) as file:
            if self.kind == "json":
                return read_json_source(file, self.name, options, resolve)
            return read_parquet_source(file, self.name, size, options=options, resolve=resolve)


def _dataset_folders(keys: list[str]) -> list[str]:
    marked = sorted({posixpath.dirname(k) for k in keys if posixpath.basename(k) in DATASET_MARKERS})
    # A DatasetDict's splits are folders with their own state.json inside it: the dict is the source.
    return [d for d in marked if not any(d.startswith(other + "/") for other in marked if other != d)]


def source_file_keys(store: Store, prefix: str) -> list[str]:
    """Every store file that makes up a source under ``prefix`` (a ``datasets`` folder's files included): what
    the new-data sensor watches."""
    keys = store.list(prefix)
    folders = _dataset_folders(keys)
    return [k for k in keys if k.endswith(FILE_SUFFIXES) or any(k.startswith(d + "/") for d in folders)]


def user_sources(store: Store, cfg, prefix: str | None = None) -> list[UserSource]:
    """The sources under ``prefix`` (default ``cfg.source_prefix``) in the store, then the hub datasets of
    ``cfg.source_datasets``."""
    keys = store.list(cfg.source_prefix if prefix is None else prefix)
    folders = _dataset_folders(keys)
    sources = [UserSource(store, "dataset", key=d) for d in folders]
    for key in keys:
        if any(key.startswith(d + "/") for d in folders):
            continue
        if key.endswith(".parquet"):
            sources.append(UserSource(store, "parquet", key=key))
        elif key.endswith((".json", ".jsonl")):
            sources.append(UserSource(store, "json", key=key))
    hub_ids = [h.strip() for h in cfg.source_datasets.split(",") if h.strip()]
    return sources + [UserSource(store, "hub", hub_id=h) for h in hub_ids]


def uses_synthetic_rows(cfg, has_user_sources: bool) -> bool:
    """Whether the synthetic scenes join the source: with ``synthetic_rows=auto`` only where the user brought no
    rows (no source files, no ``source_datasets``), so that their rows are never mixed with synthetic ones unasked;
    ``on`` and ``off`` as they say. A split sized 0 (``n_sft=0``...) is off either way."""
    if not (cfg.n_sft or cfg.n_calibrate or cfg.n_eval) or cfg.synthetic_rows == "off":
        return False
    return cfg.synthetic_rows == "on" or not has_user_sources


def _relative_images(store: Store, key: str, max_bytes: int):
    """Reads an image path relative to the file ``key``; a path that leaves the store is refused."""
    folder = posixpath.dirname(key)

    def resolve(path: str) -> bytes:
        target = posixpath.normpath(posixpath.join(folder, path))
        if posixpath.isabs(path) or target.startswith("..") or "://" in path:
            raise SourceDataError(f"image path {quoted(path)} is not relative to the file inside the store")
        try:
            size = store.size(target)
            if size > max_bytes:
                raise SourceDataError(f"image file {store.uri(target)} is {size} bytes, over max_source_file_bytes")
            return store.read_bytes(target)
        except StoreError as e:
            raise SourceDataError(f"image file {quoted(path)} is not readable ({e})") from e

    return resolve


def _load_dataset_folder(store: Store, key: str):
    from datasets import load_from_disk

    try:
        if store.is_local:
            return load_from_disk(store.uri(key))
        return load_from_disk(store.uri(key), storage_options=store.fs.storage_options)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SourceDataError(f"{store.uri(key)}: not a readable datasets folder ({quoted(str(e), 200)})") from e


def _load_hub_dataset(hub_id: str):
    from datasets import load_dataset

    try:
        return load_dataset(hub_id)
    except Exception as e:  # datasets raises many kinds: offline, missing, bad config
        raise SourceDataError(
            f"hub dataset {hub_id!r} (source_datasets) is not loadable: {quoted(str(e), 200)}; offline, it must be "
            f"in the local Hugging Face cache"
        ) from e


def local_sources(path: str, cfg) -> list[UserSource]:
    """The sources at a local ``path``: one file, a ``datasets`` folder, or a folder of source files."""
    target = Path(path).expanduser().resolve()
    if not target.exists():
        raise SourceDataError(f"{target}: no such file or folder")
    store = Store(str(target.parent))
    if target.is_file():
        kind = "parquet" if target.suffix == ".parquet" else "json" if target.suffix in (".json", ".jsonl") else None
        if kind is None:
            raise SourceDataError(f"{target}: not a .parquet, .json or .jsonl file")
        return [UserSource(store, kind, key=target.name)]
    found = user_sources(store, replace(cfg, source_datasets=""), prefix=target.name)
    if not found:
        raise SourceDataError(f"{target}: holds no Parquet, JSON or datasets files")
    return found
