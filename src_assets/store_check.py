"""A store's health: each model's current version checked against its manifest, and the leftovers of writes
that never finished, with their age.

A leftover is a version folder without a manifest (an upload cut short: by a kill, a full disk, a lost
connection) or a temporary file beside its key (a write cut short). Neither is ever read: ``Store`` refuses a
version without a manifest and skips temporary files. They only take space, so ``sweep`` deletes those older than
an age you give; the age spares a write still under way in another process. ``src-calibrate store check`` runs
both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .storage import MANIFEST, Store, StoreError


@dataclass(frozen=True)
class CurrentVersion:
    key: str  # the model's key, e.g. models/policy_checkpoint/001
    uri: str | None  # the version its CURRENT names; None when the pointer itself is unreadable
    problem: str  # "" when the version's files match its manifest


@dataclass(frozen=True)
class Leftover:
    key: str  # a version folder or a temporary file
    what: str
    age_s: float


def _modified(info: dict) -> float:
    """A listed file's modification time, from a local listing (``mtime``) or an S3 one (``LastModified``)."""
    if "mtime" in info:
        return float(info["mtime"])
    modified = info.get("LastModified")
    return modified.timestamp() if modified is not None else time.time()


def check_store(store: Store) -> tuple[list[CurrentVersion], list[Leftover]]:
    """Every model's current version, verified (``Store.verify_version``), and every leftover, oldest first."""
    if not store.fs.exists(store.root):
        return [], []
    listing = {path[len(store.root) + 1 :]: info for path, info in store.fs.find(store.root, detail=True).items()}
    now = time.time()
    currents, versions, leftovers = [], {}, []
    for key, info in sorted(listing.items()):
        parts = key.split("/")
        if parts[0] == "models" and parts[-1] == "CURRENT":
            currents.append(_checked(store, key.removesuffix("/CURRENT")))
        elif parts[0] == "models" and "versions" in parts[:-1]:
            folder = "/".join(parts[: parts.index("versions") + 2])
            names, newest = versions.get(folder, (set(), 0.0))
            versions[folder] = (names | {parts[-1]}, max(newest, _modified(info)))
        if parts[-1].startswith(".tmp-"):
            leftovers.append(Leftover(key, "a temporary file of a write cut short", now - _modified(info)))
    for folder, (names, newest) in versions.items():
        if MANIFEST not in names:
            leftovers.append(Leftover(folder, f"a version without {MANIFEST} (an upload cut short)", now - newest))
    return currents, sorted(leftovers, key=lambda leftover: -leftover.age_s)


def _checked(store: Store, key: str) -> CurrentVersion:
    try:
        uri = store.current_model(key)
    except StoreError as e:
        return CurrentVersion(key, None, str(e))
    try:
        store.verify_version(uri)
    except StoreError as e:
        return CurrentVersion(key, uri, str(e))
    return CurrentVersion(key, uri, "")


def sweep(store: Store, leftovers: list[Leftover], older_than_s: float) -> list[Leftover]:
    """Deletes the leftovers older than ``older_than_s``; returns them."""
    swept = [leftover for leftover in leftovers if leftover.age_s > older_than_s]
    for leftover in swept:
        store.delete(leftover.key)
    return swept
