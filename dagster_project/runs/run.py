"""``src-calibrate run``: the SRC loop as runs of the code location's jobs, into the persistent Dagster
instance, and a table of what each iteration did.
"""

import json
import logging
import os
import sys
import uuid
from pathlib import Path

from src_assets.fingerprints import digest as fingerprint
from src_assets.profiles import current_names

from ..tags import DATA_VERSION_TAG, RUN_HOST_TAG, RUN_PID_TAG, SETTINGS_TAG, STORE_TAG
from .recovery import (
    RunWatchdog,
    completed_iteration,
    iteration_row,
    pool_holders,
    release_dead_runs,
)


def _instance():
    """The Dagster instance in ``$DAGSTER_HOME``, made on first use with the repository's ``deploy/dagster.yaml``.

    The first use of a fresh home creates its sqlite databases, and two processes doing that at once race: one fails
    on a table the other just made, or both stamp the schema version and every later use fails on a version table
    with two heads. So every command opens the instance holding a lock file in the home, one process at a time.
    (A ``dagster-daemon`` or ``dg dev`` takes no such lock: start them on a home a command has already used.)
    """
    import fcntl

    from dagster import DagsterInstance

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".instance.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        shipped = Path(__file__).resolve().parents[2] / "deploy" / "dagster.yaml"  # the repository's instance settings
        if not (home / "dagster.yaml").exists():
            (home / "dagster.yaml").write_text(shipped.read_text() if shipped.exists() else "")
        return DagsterInstance.get()


def _meta(result, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    return {}


def _innermost(error) -> str:
    """Dagster wraps an exception raised in a step, an IO manager or a resource ('Error occurred while executing
    op ...', '... while handling output ...', 'Error executing resource_fn ...', a retry policy's request) in errors
    of its own with the real error as their cause: that cause's last line (e.g. the OSError that names the file a full disk refused)."""
    while error.cause is not None and (error.cls_name or "").startswith(("Dagster", "RetryRequestedFromPolicy")):
        error = error.cause
    message = error.message.strip().splitlines()[-1] if error.message.strip() else error.cls_name
    return message.removeprefix("dagster._core.definitions.events.Failure: ")


def _failure(result) -> str:
    """The failed step (or the resource that could not start) and its innermost cause; for a step whose retries
    ran out, the cause of its last attempt rather than Dagster's 'Exceeded max_retries'."""
    retried = {}  # step -> (attempts, the error of its latest attempt)
    for event in result.all_events:
        if event.event_type_value == "STEP_UP_FOR_RETRY" and getattr(event.event_specific_data, "error", None):
            attempts = retried.get(event.step_key, (0, None))[0] + 1
            retried[event.step_key] = (attempts, event.event_specific_data.error)
        if event.is_step_failure:
            if event.step_key in retried and "max_retries" in (event.step_failure_data.error.message or ""):
                attempts, error = retried[event.step_key]
                return f"step {event.step_key} failed ({attempts + 1} attempts): {_innermost(error)}"
            return f"step {event.step_key} failed: {_innermost(event.step_failure_data.error)}"
        if event.event_type_value == "RESOURCE_INIT_FAILURE" and getattr(event.event_specific_data, "error", None):
            return f"the run could not start: {_innermost(event.event_specific_data.error)}"
    return "the run failed"


def _failed_checks(result) -> tuple[list[str], list[str]]:
    """One line per failed check, (ERROR-level, WARN-level)."""
    errors, warnings = [], []
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed:
            continue
        line = f"check {evaluation.asset_key.to_user_string()}.{evaluation.check_name} failed: " + ", ".join(
            f"{k}={v.value}" for k, v in evaluation.metadata.items()
        )
        (warnings if evaluation.severity.value == "WARN" else errors).append(line)
    return errors, warnings


def _succeeded(result, log) -> bool:
    """Whether a run's steps and ERROR-level checks all passed; if not, one line on stderr says why."""
    if not result.success:
        print(_failure(result), file=sys.stderr)
        return False
    return _checks_passed(result, log)


def _checks_passed(result, log) -> bool:
    errors, warnings = _failed_checks(result)
    for line in warnings:
        log(f"warning: {line}")
    for line in errors:
        print(line, file=sys.stderr)
    return not errors


def usage_error(message: str) -> int:
    """A user error: one line on stderr, exit code 2, no traceback (as argparse reports its own)."""
    print(f"src-calibrate: error: {message}", file=sys.stderr)
    return 2


def overrides_from(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set takes NAME=VALUE, got {pair[:80]!r}")
        out[name.strip()] = value  # read as the setting's type by SRCConfig's profile()
    out, notes = current_names(out)
    for note in notes:
        print(f"src-calibrate: warning: {note}", file=sys.stderr)
    return out


def quiet_libraries() -> None:
    """Without -v: no per-file loading bars, dataset-map bars or deprecation warnings from the libraries, so a
    run's stderr is its step lines and progress bars."""
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    # When an S3 endpoint drops its connections, s3fs's event loop logs each orphaned request with a traceback;
    # the failed step's line already names the error.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _jobs(cfg, instance, verbose: bool) -> dict:
    """The code location's jobs (``src_foundation``, ``src_iteration``), their assets carrying this run's code
    versions, with one line per finished step as their log (``step_log``) unless ``verbose``."""
    from dagster import Definitions

    from ..automation import foundation_job, iteration_job
    from ..definitions import all_assets, all_checks
    from ..executors import local_executor
    from ..resources import build_resources
    from ..versions import with_code_versions
    from . import launch
    from .step_log import step_lines

    defs = Definitions(
        assets=with_code_versions(all_assets, cfg),  # so Dagster records the versions of this run's settings
        asset_checks=all_checks,
        jobs=[foundation_job, iteration_job],
        resources=build_resources(),
        loggers={"step_lines": step_lines(instance)},
        executor=local_executor,
    )
    return launch.resolve_jobs(defs, (foundation_job, iteration_job), instance)


def _launch(args, instance, job, config: dict, tags: dict, log, partition_key=None):
    """One run of ``job``: executed in this process, or with ``--submit`` queued for the daemon."""
    from . import launch

    if args.submit:
        return launch.submit(instance, job, config, tags, partition_key, log=lambda *a: log(*a))
    with RunWatchdog(instance, print if args.verbose else (lambda *a: print(" ", *a, file=sys.stderr))):
        if args.executor == "multiprocess":  # its steps load the job from the code location in processes of their own
            return launch.execute(instance, launch.reconstructable_job(job.name), config, tags, partition_key)
        return launch.execute(instance, job, config, tags, partition_key)


def _iteration_code_versions(cfg) -> dict[str, str]:
    """Each iteration asset's code version under ``cfg``: what a completed iteration must have been made with."""
    from ..assets.partitions import iteration_partitions
    from ..definitions import all_assets
    from ..versions import code_version

    return {
        a.key.to_user_string(): code_version(a, cfg) for a in all_assets if a.partitions_def == iteration_partitions
    }


def settings_tag(config: dict) -> str:
    """The digest of the settings a run's assets read: those its run config builds, not those the CLI parsed."""
    from dataclasses import asdict

    from ..resources import SettingsResource

    return fingerprint(asdict(SettingsResource(**config["resources"]["settings"]["config"]).config()), length=16)


def run(args) -> int:
    import socket

    from ..resources import SettingsResource, StoreResource
    from ..tags import STORE_LEASE_OWNER_TAG
    from . import launch

    store = StoreResource(base_uri=args.store) if args.store else StoreResource()
    store.store().check_writable()  # a store that cannot be written: one line (main), before anything runs
    try:
        overrides = overrides_from(args.set)
        if args.fresh:
            overrides["reuse_checkpoints"] = "false"
        settings = SettingsResource(profile=args.profile, seed=args.seed, overrides=overrides)
        cfg = settings.config()  # fails early on a bad setting
    except ValueError as e:
        return usage_error(str(e))
    instance = _instance()
    if args.submit and not launch.queue_daemon_alive(instance):
        return usage_error(
            f"--submit queues the runs for a dagster-daemon, and none is running for {instance.root_directory}: "
            f"start one (DAGSTER_HOME={instance.root_directory} dagster-daemon run -w workspace.yaml), or drop --submit"
        )
    jobs = _jobs(cfg, instance, args.verbose)
    iteration_versions = _iteration_code_versions(cfg)
    config = launch.run_config(store, settings, None if args.verbose else {"step_lines": {}}, args.executor)
    digest = settings_tag(config)
    tags = {
        RUN_HOST_TAG: socket.gethostname(),
        RUN_PID_TAG: str(os.getpid()),
        SETTINGS_TAG: digest,
        STORE_TAG: store.store().base_uri,
    }

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if not args.verbose:
        quiet_libraries()
    release_dead_runs(instance, log)
    for pool, runs in pool_holders(instance).items():
        log(f"pool {pool!r} is held by run(s) {', '.join(r[:8] for r in runs)}: model steps wait for it")
    from src_assets.leases import LeaseHeld, acquire_lease
    from src_assets.storage import StoreError

    from .. import store_layout

    try:
        owner = f"src-calibrate-{uuid.uuid4().hex[:12]}"
        lease = acquire_lease(
            store.store(), store_layout.STORE_RUN_LEASE, owner, command="src-calibrate run", settings=digest
        )
        tags[STORE_LEASE_OWNER_TAG] = owner  # its runs hold the store under this command's lease
    except LeaseHeld as e:
        print(
            f"src-calibrate: another run is using this store, so this run writes nothing: {e}. Wait for it to "
            f"end, or give this run its own --store",
            file=sys.stderr,
        )
        return 1
    try:  # a StoreError (e.g. a CURRENT pointer written by hand) is one line in main, after the release
        return _run_holding_the_store(args, store, jobs, config, instance, tags, digest, iteration_versions, log)
    finally:
        try:
            lease.release()
        except StoreError as e:  # a store that stopped answering: said, without hiding why the run ended
            print(f"src-calibrate: {e}", file=sys.stderr)


def _run_holding_the_store(args, store, jobs, config, instance, tags, digest, iteration_versions, log) -> int:
    from ..assets.partitions import iteration_key, iteration_partitions

    log(f"data, base models, rationale SFT and the judge (profile {args.profile}, store {store.store().base_uri})")
    result = _launch(args, instance, jobs["src_foundation"], config, tags, log)
    if not _succeeded(result, log):
        return 1
    sft = _meta(result, "sft_eval")
    foundation_data_versions = {
        e.asset_key.to_user_string(): (e.materialization.tags or {}).get(DATA_VERSION_TAG)
        for e in result.get_asset_materialization_events()
    }
    start = _meta(result, "sft_checkpoint").get("model")
    rows = [
        {
            "iteration": 0,
            **{k: sft.get(k) for k in ("accuracy", "factuality", "consistency")},
            "pairs_kept": None,
            "mean_weight": None,
            "checkpoint": start,
        }
    ]
    keys = [iteration_key(k) for k in range(1, args.iterations + 1)]
    instance.add_dynamic_partitions(iteration_partitions.name, keys)
    for key in keys:
        done = (
            None
            if args.fresh
            else completed_iteration(
                instance, store.store(), key, start, digest, iteration_versions, foundation_data_versions, log
            )
        )
        if done is not None:
            log(
                f"iteration {key}: already complete with these settings (policy {done['checkpoint']}); --fresh recomputes it"
            )
            rows.append(done)
            start = done["checkpoint"]
            continue
        log(f"iteration {key}")
        result = _launch(args, instance, jobs["src_iteration"], config, tags, log, partition_key=key)
        if not _succeeded(result, log):
            return 1
        rows.append(
            iteration_row(key, {a: _meta(result, a) for a in ("pairwise_scores", "preference_set", "iteration_eval")})
        )
        start = rows[-1]["checkpoint"]
    _print(rows, args.json)
    return 0


def _print(rows: list[dict], as_json: bool) -> None:
    # NaN (e.g. no clear pair for judge_agreement) is not JSON: it is printed as null.
    rows = [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()} for r in rows]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"{'iteration':>9} {'accuracy':>9} {'factuality':>10} {'consistency':>11} {'pairs kept':>10} {'mean weight':>11} "
        f"{'judge agreement':>15}  checkpoint"
    )
    fmt = lambda v, w: f"{v:>{w}.3f}" if isinstance(v, float) else f"{'-' if v is None else v:>{w}}"
    for r in rows:
        print(
            f"{r['iteration']:>9} {fmt(r.get('accuracy'), 9)} {fmt(r.get('factuality'), 10)} {fmt(r.get('consistency'), 11)} "
            f"{fmt(r.get('pairs_kept'), 10)} {fmt(r.get('mean_weight'), 11)} {fmt(r.get('judge_agreement'), 15)}  {r.get('checkpoint')}"
        )
    for note in _dash_reasons(rows):
        print(note)


def _dash_reasons(rows: list[dict]) -> list[str]:
    """Why a cell of the table is '-': each reason once, under the table."""
    notes = ["-: iteration 0 is the SFT checkpoint; it has no pairs, weights or judge agreement"]
    if any(r.get("factuality") is None or r.get("consistency") is None for r in rows):
        notes.append("-: factuality and consistency are the verifier's, and it needs scenes these rows do not have")
    if any(r["iteration"] > 0 and r.get("judge_agreement") is None for r in rows):
        notes.append(
            "-: judge agreement needs pairs the verifier calls clear, and there were none (rows without scenes, or "
            "every pair a tie)"
        )
    return notes
