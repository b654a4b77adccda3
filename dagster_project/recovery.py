"""Recovery: what ``src-calibrate run`` does about runs that died and iterations that are already done.

- ``release_dead_runs``: a run killed with ``kill -9`` stays STARTED in the instance and keeps its pool slot,
  which would block every later run. Runs this machine's ``src-calibrate`` started whose process is gone are
  reported failed, and pool slots held by ended runs are freed.
- ``RunWatchdog``: while a run executes, it does that again every few seconds, so a step waiting on a pool whose
  holder died goes on; and it ends the process on SIGTERM or SIGINT while no step's code runs. Dagster only
  raises a captured interrupt inside a step, so a step waiting on a pool would otherwise ignore both.
- ``completed_iteration``: an iteration an earlier run completed with the same settings, from the same start
  policy, whose committed policy is still intact, is reused rather than recomputed.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

from src_assets.storage import Lease, StoreError, process_alive

from . import store_layout

RUN_HOST_TAG, RUN_PID_TAG, SETTINGS_TAG, STORE_TAG = "src/host", "src/pid", "src/settings", "src/store"
ITERATION_ROW = ("accuracy", "factuality", "consistency", "pairs_kept", "mean_weight", "judge_agreement")
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a command ended by an interrupt


def _live_runs_of_this_host(instance):
    from dagster import DagsterRunStatus, RunsFilter

    live = [DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.NOT_STARTED]
    return instance.get_runs(RunsFilter(statuses=live, tags={RUN_HOST_TAG: socket.gethostname()}))


def release_dead_runs(instance, log) -> int:
    """Reports this host's src-calibrate runs whose process is gone as failed and frees the pool slots of runs
    that have ended; returns how many slots' runs were freed."""
    for run in _live_runs_of_this_host(instance):
        pid = int(run.tags.get(RUN_PID_TAG, "0"))
        if pid and pid != os.getpid() and not process_alive(pid):
            instance.report_run_failed(run, message=f"its src-calibrate process {pid} is gone")
            log(f"run {run.run_id[:8]} died with its process {pid}: marked failed")
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return 0
    freed = 0
    for run_id in storage.get_concurrency_run_ids():
        run = instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            storage.free_concurrency_slots_for_run(run_id)
            log(f"freed the pool slot held by run {run_id[:8]}, which has ended")
            freed += 1
    return freed


def pool_holders(instance) -> dict[str, list[str]]:
    """Each concurrency pool that some run holds, with the runs holding it."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    holders = {
        pool: sorted(storage.get_concurrency_info(pool).active_run_ids) for pool in storage.get_concurrency_keys()
    }
    return {pool: runs for pool, runs in holders.items() if runs}


class RunWatchdog:
    """A thread beside a run executing in this process (``with RunWatchdog(instance, log):``).

    Every ``every_s`` seconds it releases dead runs (``release_dead_runs``). When an interrupt that Dagster
    captured is still pending a second later, no step's code is running to raise it (the run waits on a pool):
    the watchdog then reports this process's runs failed, frees their pool claims, releases the leases this
    process holds and exits with code 130. Nothing is half-written: no step is running, and every write is
    atomic anyway."""

    def __init__(self, instance, log, every_s: float = 5.0):
        self.instance, self.log, self.every_s = instance, log, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="src-calibrate watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        from dagster._utils.interrupts import check_captured_interrupt

        pending_since, last_release = None, time.monotonic()
        while not self._stop.wait(0.5):
            clock = time.monotonic()
            if check_captured_interrupt():
                pending_since = clock if pending_since is None else pending_since
                if clock - pending_since >= 1.0:
                    self._end_interrupted()
            else:
                pending_since = None
            if clock - last_release >= self.every_s:
                last_release = clock
                try:
                    release_dead_runs(self.instance, self.log)
                except Exception as e:  # a busy instance database: the next round tries again
                    self.log(f"warning: could not check for dead runs ({type(e).__name__}: {e})")

    def _end_interrupted(self) -> None:
        mine = [r for r in _live_runs_of_this_host(self.instance) if r.tags.get(RUN_PID_TAG) == str(os.getpid())]
        for run in mine:
            self.instance.report_run_failed(run, message="src-calibrate was interrupted while the run waited on a pool")
            self.instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        Lease.release_all()
        print(
            f"src-calibrate: interrupted while waiting on a pool; run(s) {', '.join(r.run_id[:8] for r in mine) or '-'} "
            f"marked failed, nothing written",
            file=sys.stderr,
            flush=True,
        )
        os._exit(INTERRUPTED_EXIT_CODE)


def _latest_run_of(instance, key: str, store_uri: str, settings_digest: str) -> str | None:
    """The latest run that evaluated iteration ``key`` into this store with these settings. One Dagster instance
    may serve several stores, so the latest materialization of the partition may be another store's."""
    from dagster import AssetKey, AssetRecordsFilter

    cursor = None
    while True:
        page = instance.fetch_materializations(
            AssetRecordsFilter(AssetKey("iteration_eval"), asset_partitions=[key]), limit=100, cursor=cursor
        )
        for record in page.records:
            run = instance.get_run_by_id(record.event_log_entry.run_id)
            if (
                run is not None
                and run.tags.get(STORE_TAG) == store_uri
                and run.tags.get(SETTINGS_TAG) == settings_digest
            ):
                return run.run_id
        if not page.has_more:
            return None
        cursor = page.cursor


def completed_iteration(instance, store, key: str, start: str, settings_digest: str, log=print) -> dict | None:
    """Iteration ``key``'s row if an earlier run completed it into this store with these settings, from this start
    policy, and its policy is still the committed one, intact: a rerun after a crash continues from there instead
    of recomputing it. A committed policy that fails its manifest check (truncated, changed) counts as absent: it
    is recomputed."""
    from dagster import AssetKey, AssetRecordsFilter

    run_id = _latest_run_of(instance, key, store.base_uri, settings_digest)
    if run_id is None:
        return None
    events = {}
    for asset in ("pairwise_scores", "preference_set", "policy_checkpoint", "iteration_eval"):
        records = instance.fetch_materializations(
            AssetRecordsFilter(AssetKey(asset), asset_partitions=[key]), limit=100
        ).records
        mine = [r.event_log_entry for r in records if r.event_log_entry.run_id == run_id]
        if not mine:
            return None
        events[asset] = mine[0]
    meta = {a: {k: v.value for k, v in e.asset_materialization.metadata.items()} for a, e in events.items()}
    if meta["policy_checkpoint"].get("started_from") != start or meta["iteration_eval"].get(
        "checkpoint"
    ) != store.current_model(store_layout.policy_model(key)):
        return None
    try:
        store.local_model_dir(meta["iteration_eval"]["checkpoint"])
    except StoreError as e:
        log(f"iteration {key}: its committed policy fails verification, so the iteration runs again ({e})")
        return None
    return iteration_row(key, meta)


def iteration_row(key: str, meta: dict[str, dict]) -> dict:
    """Iteration ``key``'s row of the run summary, from its assets' metadata (by asset name)."""
    m = {**meta["pairwise_scores"], **meta["preference_set"], **meta["iteration_eval"]}
    return {"iteration": int(key), **{k: m.get(k) for k in ITERATION_ROW}, "checkpoint": m.get("checkpoint")}
