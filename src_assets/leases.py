"""One writer at a time, on any store: a lease is a file created only if none exists (``Store.create_exclusive``),
so of two runs that want to write the same iteration, from one Dagster instance or from two sharing the store,
exactly one gets it. The holder's heartbeat keeps it fresh; a lease whose process is gone (same host) or whose
heartbeat stopped (any host, after its ``ttl_s``) is taken over, so a killed run blocks nobody for long.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time

from .storage import Store, StoreError

LEASE_TTL_S = 300.0  # a lease whose heartbeat is older than this is abandoned (its holder died on another host)
# No lease outlives its last heartbeat by more than this, whatever ttl_s its record states: a record written by hand
# or by a broken writer (ttl_s=1e12) cannot block a store for good.
MAX_LEASE_TTL_S = 3600.0


class LeaseHeld(StoreError):
    """Another live writer holds the lease; the message names it (run, host, pid, since when)."""


class Lease:
    """A held lease: a daemon thread refreshes its heartbeat every ``ttl_s / 5`` until ``release()``.

    A process that dies stops beating, which is how other writers learn it is gone. A handle that does not
    ``own`` the lease (its owner held it already) neither beats nor deletes it."""

    _held: set["Lease"] = set()  # this process's owned leases, for release_all

    def __init__(self, store: Store, key: str, record: dict, owns: bool = True):
        self.store, self.key, self.record, self.owns = store, key, record, owns
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_released, name=f"lease {key}", daemon=True)
        if owns:
            self._thread.start()
            Lease._held.add(self)

    @classmethod
    def release_all(cls) -> None:
        """Releases every lease this process holds: for a process about to end without unwinding its stack."""
        for lease in list(cls._held):
            try:
                lease.release()
            except Exception:  # an unreachable store: the lease ages out by its heartbeat
                pass

    def _beat(self) -> None:
        held = read_lease(self.store, self.key)
        if held and "unreadable" not in held and held.get("owner") != self.record["owner"]:
            return  # another writer took it over (this holder was thought dead): never overwrite theirs
        self.store.write_json(self.key, {**self.record, "heartbeat": time.time()})

    def _beat_until_released(self) -> None:
        while not self._stop.wait(self.record["ttl_s"] / 5):
            try:
                self._beat()
            except Exception:  # a store that is briefly unreachable: the next beat tries again
                pass

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease; ``StoreError`` when the store cannot be reached to delete it,
        saying when it lapses by itself."""
        if not self.owns:
            return
        Lease._held.discard(self)
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            held = read_lease(self.store, self.key)
            if held is not None and held.get("owner") == self.record["owner"]:
                self.store.delete(self.key)
        except Exception as e:  # the store stopped answering: the lease lapses once its heartbeat is old
            lapses = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() + self.record["ttl_s"]))
            raise StoreError(
                f"the lease {self.store.uri(self.key)} could not be released ({type(e).__name__}: {e}); it lapses "
                f"by {lapses}, and a run on this host takes it over as soon as this process has ended"
            ) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _finite(value) -> float | None:
    """``value`` as a finite float, or None (a lease written by hand, by another version, or cut short)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def read_lease(store: Store, key: str) -> dict | None:
    """The lease record, None if there is none; an unreadable one is ``{"unreadable": <its first bytes>}``,
    treated as abandoned once its file is older than the TTL."""
    try:
        data = store.read_bytes(key)
    except StoreError as e:
        if isinstance(e.__cause__, FileNotFoundError):  # no lease
            return None
        raise
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"unreadable": data[:80].decode(errors="replace")}


def acquire_lease(store: Store, key: str, owner: str, ttl_s: float = LEASE_TTL_S, **about) -> Lease:
    """The lease ``key`` for ``owner`` (a run id), or ``LeaseHeld`` naming the live holder.

    The same owner may acquire it again (a step of a run whose command holds it already): that gives a handle
    whose release leaves the lease to its first holder. A lease whose holder is gone is taken over: its
    process is dead on this host, or its heartbeat is older than its own ``ttl_s``."""
    record = {
        "owner": owner,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "acquired": time.time(),
        "ttl_s": ttl_s,
        **about,
    }
    for _ in range(3):
        if store.create_exclusive(key, json.dumps({**record, "heartbeat": time.time()}).encode()):
            return Lease(store, key, record)
        held = read_lease(store, key)
        if held is None:
            continue  # released meanwhile: try again
        if held.get("owner") == owner:
            if not _abandoned(store, key, held):  # held by this owner already: the first holder releases it
                return Lease(store, key, held, owns=False)
            store.write_json(key, {**record, "heartbeat": time.time()})  # its earlier process died: this one holds it
            return Lease(store, key, record)
        if not _abandoned(store, key, held):
            acquired = _finite(held.get("acquired"))
            if not held.get("owner") or acquired is None:
                content = held.get("unreadable", json.dumps(held, sort_keys=True)[:80])
                raise LeaseHeld(
                    f"{store.uri(key)} is unreadable or incomplete ({content!r}); it counts as "
                    f"held until its file is {LEASE_TTL_S:.0f} s old, or delete it if no run is writing"
                )
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(acquired))
            expiry = _expiry(store, key, held)
            expires = (
                f"it expires at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(expiry))} unless its "
                f"holder's heartbeat renews it"
                if expiry is not None
                else "it expires once its holder's heartbeat stops"
            )
            raise LeaseHeld(
                f"{store.uri(key)} is held by {held.get('owner', '?')} (host {held.get('host', '?')}, "
                f"pid {held.get('pid', '?')}, since {since}; {expires})"
            )
        if read_lease(store, key) == held:  # nobody took it over between our two reads
            store.delete(key)
    raise LeaseHeld(f"{store.uri(key)}: could not take the lease; another writer keeps taking it")


def _abandoned(store: Store, key: str, held: dict) -> bool:
    """Whether a lease's holder is gone: its process is dead on this host, or its heartbeat is older than its
    TTL. A heartbeat that is not a finite number, or lies in the future (another host's clock runs ahead), is
    not trusted: the lease file's own modification time, which every beat renews, stands in for it."""
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not process_alive(held["pid"]):
        return True
    expiry = _expiry(store, key, held)
    return expiry is not None and time.time() > expiry


def _expiry(store: Store, key: str, held: dict) -> float | None:
    """When a lease lapses unless renewed: its last heartbeat plus its TTL (at most ``MAX_LEASE_TTL_S``)."""
    ttl = _finite(held.get("ttl_s"))
    ttl = min(ttl, MAX_LEASE_TTL_S) if ttl is not None and ttl > 0 else LEASE_TTL_S
    heartbeat = _finite(held.get("heartbeat"))
    if heartbeat is None or heartbeat > time.time() + 1:
        heartbeat = store.modified(key)
        if heartbeat is None:
            return None
    return heartbeat + ttl
