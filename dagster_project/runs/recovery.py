"""Recovery: what ``src-calibrate run`` does about runs that died and iterations that are already done.

- ``release_dead_runs``: a run killed with ``kill -9`` stays STARTED in the instance and keeps its pool slot,
  which would block every later run. Runs this machine's ``src-calibrate`` started whose process is gone are
  reported failed, and pool slots held by ended runs are freed.
- ``RunWatchdog``: while a run executes, it does that again every few seconds, so a step waiting on a pool whose
  holder died goes on; and it makes sure a SIGTERM or SIGINT ends the run. Dagster only raises a captured
  interrupt inside a step, so a step waiting on a pool would otherwise ignore it; and inside a step the interrupt
  is an exception raised wherever the step's code happens to be, which code that catches every exception (SQLAlchemy
  closing a connection does) swallows, so the run would go on to its end.
- ``completed_iteration``: an iteration an earlier run completed with the same settings, from the same start
  policy, whose committed policy is still intact, is reused rather than recomputed.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from src_assets.leases import Lease, process_alive
from src_assets.storage import StoreError

from .. import store_layout
from ..tags import CODE_VERSION_TAG, INPUT_DATA_VERSION_TAG, RUN_HOST_TAG, RUN_PID_TAG, SETTINGS_TAG, STORE_TAG

ITERATION_ROW = ("accuracy", "factuality", "consistency", "pairs_kept", "mean_weight", "judge_agreement")
INTERRUPTED_EXIT_CODE = 130  # the shell's code for a command ended by an interrupt
STOP_GRACE_S = 15.0  # how long a run has to stop by itself after a SIGTERM or SIGINT before it is ended


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

    Every ``every_s`` seconds it releases dead runs (``release_dead_runs``). It also sees every SIGTERM and
    SIGINT this process receives (a wakeup file descriptor, which the interpreter writes to whatever Python
    handler Dagster has installed at that moment), and ends the run itself when the run has not ended:

    - a second after the interrupt, if Dagster's captured interrupt is still pending: no step's code is running
      to raise it (the run waits on a pool);
    - ``STOP_GRACE_S`` after it in any case: the interrupt was raised in a step and swallowed there.

    Ending the run reports this process's runs failed, frees their pool claims, stops its child processes,
    releases the leases this process holds and exits with code 130. Nothing is half-written: every write to the
    store is atomic, and a version without its manifest is never used. A run that ends by itself after an
    interrupt, even successfully, ends the command with code 130 too, rather than starting the next run."""

    def __init__(self, instance, log, every_s: float = 5.0):
        self.instance, self.log, self.every_s = instance, log, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="src-calibrate watchdog", daemon=True)
        self._signals, self._previous_wakeup, self.interrupted_at = None, None, None
        # This command's own stderr: inside a step Dagster points fd 2 at a `tee` child that copies it to the
        # step's log, and ending the run stops the children.
        self._stderr = os.dup(2)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set the wakeup fd
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self._signals = (read, write)
            self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        if self._signals is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            self._take_signals()
            for fd in self._signals:
                os.close(fd)
        if self.interrupted_at is not None:
            self._end("interrupted; the run ended, and no other starts")
        os.close(self._stderr)

    def _take_signals(self) -> None:
        if self._signals is None:
            return
        try:
            received = os.read(self._signals[0], 512)
        except BlockingIOError:
            return
        if self.interrupted_at is None and ({signal.SIGTERM, signal.SIGINT} & set(received)):
            self.interrupted_at = time.monotonic()

    def _watch(self) -> None:
        from .launch import interrupt_captured

        pending_since, last_release = None, time.monotonic()
        while not self._stop.wait(0.5):
            clock = time.monotonic()
            self._take_signals()
            if interrupt_captured():
                pending_since = clock if pending_since is None else pending_since
                if clock - pending_since >= 1.0:
                    self._end("interrupted while the run waited on a pool")
            else:
                pending_since = None
            if self.interrupted_at is not None and clock - self.interrupted_at >= STOP_GRACE_S:
                self._end(f"interrupted, and the run had not stopped {STOP_GRACE_S:.0f} s later")
            if clock - last_release >= self.every_s:
                last_release = clock
                try:
                    release_dead_runs(self.instance, self.log)
                except Exception as e:  # a busy instance database: the next round tries again
                    self.log(f"warning: could not check for dead runs ({type(e).__name__}: {e})")

    def _end(self, why: str) -> None:
        mine = [r for r in _live_runs_of_this_host(self.instance) if r.tags.get(RUN_PID_TAG) == str(os.getpid())]
        for run in mine:  # none when the run has ended by itself
            self.instance.report_run_failed(run, message=f"src-calibrate was interrupted: {why}")
            self.instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        Lease.release_all()
        failed = f"; run(s) {', '.join(r.run_id[:8] for r in mine)} marked failed" if mine else ""
        os.write(self._stderr, f"\nsrc-calibrate: {why}{failed}; leases released\n".encode())
        for child in _child_processes():
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        os._exit(INTERRUPTED_EXIT_CODE)


def _child_processes() -> list[int]:
    """This process's children (Linux ``/proc``; none elsewhere): a training under ``accelerate``, a vLLM server."""
    children = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        try:
            children += [int(pid) for pid in task.read_text().split()]
        except OSError:
            pass
    return children


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


def completed_iteration(
    instance,
    store,
    key: str,
    start: str,
    settings_digest: str,
    code_versions: dict[str, str],
    upstream_data_versions: dict[str, str],
    log=print,
) -> dict | None:
    """Iteration ``key``'s row if an earlier run completed it into this store with these settings, from this start
    policy, and its policy is still the committed one, intact: a rerun after a crash continues from there instead
    of recomputing it.

    It is reused only where Dagster would call it fresh: each of its assets (``code_versions``: asset -> the code
    version it has now) was materialized by that run under the same code version, from the same data versions of
    the assets upstream of the iteration (``upstream_data_versions``, as this command's foundation run recorded
    them: a judge retrained by new code makes its scores stale). Otherwise the run says which asset differs,
    and the iteration is recomputed. A committed policy that fails its manifest check (truncated, changed) counts
    as absent: it is recomputed."""
    from dagster import DagsterEventType

    run_id = _latest_run_of(instance, key, store.base_uri, settings_digest)
    if run_id is None:
        return None
    made = {
        e.dagster_event.asset_key.to_user_string(): e.dagster_event.materialization
        for e in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)
    }
    for asset, version in code_versions.items():
        if asset not in made:
            return None
        tags = made[asset].tags or {}
        if tags.get(CODE_VERSION_TAG) != version:
            log(
                f"iteration {key}: {asset} was made by other code or settings ({tags.get(CODE_VERSION_TAG)}, now "
                f"{version}), so the iteration runs again"
            )
            return None
        for upstream, data_version in upstream_data_versions.items():
            recorded = tags.get(INPUT_DATA_VERSION_TAG + upstream)
            if recorded is not None and recorded != data_version:
                log(f"iteration {key}: {asset} read another {upstream} than this run's, so the iteration runs again")
                return None
    meta = {a: {k: v.value for k, v in m.metadata.items()} for a, m in made.items()}
    if meta["policy_checkpoint"].get("started_from") != start or meta["iteration_eval"].get(
        "checkpoint"
    ) != store.current_model(store_layout.policy_checkpoint(key)):
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
