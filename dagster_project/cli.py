"""``src-calibrate``: runs the SRC loop through Dagster into a persistent instance, or scores a checkpoint.

The runs land in ``$DAGSTER_HOME`` (default ``./.dagster_home``), so
``dg dev`` shows their history, metadata and checks afterwards.
"""

import argparse
import json
import logging
import os
import re
import sys
import textwrap
import uuid
from pathlib import Path

from src_assets.config import PROFILES, current_names
from src_assets.fingerprints import digest as fingerprint

from .experiments import VARIANTS, experiment
from .generation_benchmark import bench_generation
from .recovery import (
    DATA_VERSION_TAG,
    RUN_HOST_TAG,
    RUN_PID_TAG,
    SETTINGS_TAG,
    STORE_TAG,
    RunWatchdog,
    completed_iteration,
    iteration_row,
    pool_holders,
    release_dead_runs,
)


def _instance():
    """The Dagster instance in ``$DAGSTER_HOME``, made on first use with the repository's ``dagster.yaml``.

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
        shipped = Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml"  # the repository's instance settings
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


def _usage_error(message: str) -> int:
    """A user error: one line on stderr, exit code 2, no traceback (as argparse reports its own)."""
    print(f"src-calibrate: error: {message}", file=sys.stderr)
    return 2


def _overrides(pairs: list[str]) -> dict:
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


def _quiet_libraries() -> None:
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

    from .automation import foundation_job, iteration_job
    from .definitions import all_assets, all_checks, build_resources
    from .executors import local_executor
    from .step_log import step_lines
    from .versions import with_code_versions

    defs = Definitions(
        assets=with_code_versions(all_assets, cfg),  # so Dagster records the versions of this run's settings
        asset_checks=all_checks,
        jobs=[foundation_job, iteration_job],
        resources=build_resources(),
        loggers={"step_lines": step_lines(instance)},
        executor=local_executor,
    )
    # Resolving the jobs reads the instance's definitions state; a test process may hold a disposed instance's
    # storage as the current one, so this instance's is named explicitly.
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(instance.defs_state_storage):
        return {job.name: defs.resolve_job_def(job.name) for job in (foundation_job, iteration_job)}


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
    from .definitions import all_assets
    from .loop_assets import iteration_partitions
    from .versions import code_version

    return {
        a.key.to_user_string(): code_version(a, cfg) for a in all_assets if a.partitions_def == iteration_partitions
    }


def settings_tag(config: dict) -> str:
    """The digest of the settings a run's assets read: those its run config builds, not those the CLI parsed."""
    from dataclasses import asdict

    from .resources import SettingsResource

    return fingerprint(asdict(SettingsResource(**config["resources"]["settings"]["config"]).config()), length=16)


def run(args) -> int:
    import socket

    from . import launch
    from .resources import STORE_LEASE_OWNER_TAG, SettingsResource, StoreResource

    store = StoreResource(base_uri=args.store) if args.store else StoreResource()
    store.store().check_writable()  # a store that cannot be written: one line (main), before anything runs
    try:
        overrides = _overrides(args.set)
        if args.fresh:
            overrides["reuse_checkpoints"] = "false"
        settings = SettingsResource(profile=args.profile, seed=args.seed, overrides=overrides)
        cfg = settings.config()  # fails early on a bad setting
    except ValueError as e:
        return _usage_error(str(e))
    instance = _instance()
    if args.submit and not launch.queue_daemon_alive(instance):
        return _usage_error(
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
        _quiet_libraries()
    release_dead_runs(instance, log)
    for pool, runs in pool_holders(instance).items():
        log(f"pool {pool!r} is held by run(s) {', '.join(r[:8] for r in runs)}: model steps wait for it")
    from src_assets.storage import LeaseHeld, StoreError

    from . import store_layout

    try:
        owner = f"src-calibrate-{uuid.uuid4().hex[:12]}"
        lease = store.store().acquire_lease(
            store_layout.STORE_RUN_LEASE, owner, command="src-calibrate run", settings=digest
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
    from .loop_assets import iteration_key, iteration_partitions

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


def evaluate(args) -> int:
    from src_assets.base_stage import evaluate_captions
    from src_assets.evaluation import evaluate_policy, full_anatomy, with_blank_images
    from src_assets.models import Runtime, load_policy
    from src_assets.source_data import synthetic_source
    from src_assets.storage import Store

    if args.n < 1 or args.samples < 0 or not args.temperature > 0:
        return _usage_error(
            f"--n must be >= 1, --samples >= 0 and --temperature > 0 (got {args.n}, {args.samples}, {args.temperature})"
        )
    _quiet_libraries()  # no weight-loading bars around the one line of scores
    store = Store(args.store) if args.store else Store()
    store.check_reachable()
    if args.data:
        return _evaluate_on_data(args, store)
    if args.against or args.set:
        return _usage_error("--against and --set go with --data (your rows); the synthetic scenes need neither")
    model, processor = load_policy(_model_dir(store, args.checkpoint), Runtime(args.device, args.dtype))
    held_out = synthetic_source(args.seed, 0, 0, args.n)
    if args.images == "blank":
        held_out = with_blank_images(held_out)
    row = {"checkpoint": args.checkpoint, "seed": args.seed, "images": args.images, "task": args.task}
    if args.task == "caption":
        summary, _ = evaluate_captions(model, processor, held_out)
        row.update(summary)
        print(json.dumps(row, indent=1) if args.json else _line(row))
        return 0
    summary, scored = evaluate_policy(model, processor, held_out)
    row.update(summary)
    if args.anatomy:
        row["anatomy"] = full_anatomy(
            model, processor, held_out, scored, args.samples, args.temperature, seed=args.seed
        )
    if args.json:
        print(json.dumps(row, indent=1))
        return 0
    print(_line({k: v for k, v in row.items() if k != "anatomy"}))
    if args.anatomy:
        print(anatomy_table(row["anatomy"]))
    return 0


def _model_dir(store, reference: str) -> str:
    """A checkpoint as a local model directory: a stored version (checked against its manifest), a model asset's
    folder (its current version), or your own model directory; a hub id, or a path that does not exist, is left
    for ``load_policy`` to load or to name."""
    if "://" not in reference and not Path(reference).is_dir():
        return reference
    return store.local_model_dir(store.current_version(reference))


def _evaluate_on_data(args, store) -> int:
    """``evaluate --data``: the checkpoint on the user's rows of one split (accuracy from their ``answer``), and
    with ``--against``, the judge's win rate of the checkpoint over another one on the same rows."""
    import polars as pl

    from src_assets.config import profile
    from src_assets.evaluation import evaluate_policy, full_anatomy
    from src_assets.generation import generate_responses
    from src_assets.judge import Judge
    from src_assets.models import Runtime, load_policy
    from src_assets.source_data import SourceDataError, combine_sources
    from src_assets.source_files import local_sources, source_options
    from src_assets.verifier import VERIFIER_JUDGE, check_scenes_to_judge

    try:
        cfg = profile("default", **_overrides(args.set))
        options = source_options(cfg)
        sources = local_sources(args.data, cfg)
        rows = combine_sources([(src.name, src.read(options)) for src in sources])
    except (ValueError, SourceDataError) as e:
        return _usage_error(str(e))
    rows = rows.filter(pl.col("split") == args.split).head(args.n)
    if rows.is_empty():
        return _usage_error(f"{args.data} has no rows with split {args.split!r}")
    if args.against and args.judge == VERIFIER_JUDGE:
        try:
            check_scenes_to_judge(rows, f"{args.split!r} rows of {args.data}")
        except ValueError as e:
            return _usage_error(str(e))
    runtime = Runtime(args.device, args.dtype)
    model, processor = load_policy(_model_dir(store, args.checkpoint), runtime)
    summary, scored = evaluate_policy(model, processor, rows)
    row = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, **summary}
    if args.anatomy:
        row["anatomy"] = full_anatomy(model, processor, rows, scored, args.samples, args.temperature, seed=args.seed)
    if args.against:
        other, other_processor = load_policy(_model_dir(store, args.against), runtime)
        old = generate_responses(other, other_processor, rows["question"].to_list(), rows["image"].to_list())
        judge = Judge.load(args.judge, runtime, cfg.judge, lambda ref: _model_dir(store, ref))
        row.update(against=args.against, judge=args.judge)
        row["judge_win_rate"] = judge.win_rate(rows, scored["response"].to_list(), old)
    print(json.dumps(row, indent=1) if args.json else _line({k: v for k, v in row.items() if k != "anatomy"}))
    return 0


def export(args) -> int:
    """``export``: an iteration's preference set as a Hugging Face dataset in TRL's columns."""
    from src_assets.export import export_preference_set
    from src_assets.storage import Store

    from . import store_layout
    from .loop_assets import iteration_key

    if args.iteration < 1:
        return _usage_error(f"--iteration must be >= 1 (got {args.iteration})")
    store = Store(args.store) if args.store else Store()
    store.check_reachable()
    key = store_layout.asset_table("preference_set", iteration_key(args.iteration))
    if not store.exists(key):
        return _usage_error(f"{store.uri(key)} does not exist: iteration {args.iteration} has no preference set")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        return _usage_error(f"{out} exists and is not empty; give --out a new folder")
    dataset = export_preference_set(store.read_table(key), out, kept_only=not args.all_pairs)
    print(f"{dataset.num_rows} pairs -> {out} (datasets.load_from_disk; columns {dataset.column_names})")
    return 0


def settings(args) -> int:
    """``settings``: every setting, in sections, with its value in the profile, what it accepts, and its help."""
    from src_assets.config import profile, setting_reference

    rows = setting_reference(profile(args.profile))
    if args.json:
        print(json.dumps(rows, default=list, indent=1))
        return 0
    section = None
    for row in rows:
        if row["section"] != section:
            section = row["section"]
            print(f"\n{section}")
        allowed = f", {row['allowed']}" if row["allowed"] else ""
        print(f"  {row['name']} = {row['value']!r}  ({row['type']}{allowed})")
        print(textwrap.fill(row["help"], width=100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    print(f"\n--set NAME=VALUE sets one; --set sft.FIELD=VALUE (base, sft, judge, dpo, lora) sets a trainer field.")
    return 0


def store_check(args) -> int:
    """``store check``: each model's current version against its manifest, and the leftovers of writes that
    never finished; ``--sweep HOURS`` deletes the leftovers older than that. Exit 1 when a current version is
    broken."""
    from src_assets.storage import Store
    from src_assets.store_check import check_store, sweep

    if args.sweep is not None and not args.sweep >= 0:
        return _usage_error(f"--sweep takes hours >= 0 (got {args.sweep})")
    store = Store(args.store) if args.store else Store()
    store.check_reachable()
    currents, leftovers = check_store(store)
    for current in currents:
        state = f"broken: {current.problem}" if current.problem else f"ok  {current.uri.rsplit('/', 1)[-1]}"
        print(f"{current.key:<40} {state}")
    swept = sweep(store, leftovers, args.sweep * 3600) if args.sweep is not None else []
    for leftover in leftovers:
        done = "swept" if leftover in swept else "left"
        print(f"{leftover.key}: {leftover.what}, {leftover.age_s / 3600:.1f} h old ({done})")
    broken = sum(bool(current.problem) for current in currents)
    hint = "" if args.sweep is not None or not leftovers else "; --sweep HOURS deletes those older than HOURS"
    print(
        f"{len(currents)} models: {len(currents) - broken} ok, {broken} broken; {len(leftovers)} leftover(s), "
        f"{len(swept)} swept{hint}"
    )
    return 1 if broken else 0


def _line(row: dict) -> str:
    return "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def anatomy_table(anatomy: dict) -> str:
    """The anatomy as a plain-text table: one row per measure, one column per question kind."""
    from src_assets.evaluation import ANATOMY_ROWS

    rows = [*ANATOMY_ROWS, *(["any_correct_and_consistent_in_k"] if "k" in anatomy.get("all", {}) else [])]
    kinds = list(anatomy)
    width = max(map(len, rows)) + 2
    if "k" in anatomy.get("all", {}):
        rows[-1] = f"any_correct_and_consistent_in_{anatomy['all']['k']}"
    lines = ["".ljust(width) + "".join(f"{k:>11}" for k in kinds)]
    for label, key in zip(rows, [*ANATOMY_ROWS, "any_correct_and_consistent_in_k"]):
        lines.append(
            label.ljust(width)
            + "".join(f"{anatomy[k][key]:>11.3f}" if anatomy[k].get(key) is not None else f"{'':>11}" for k in kinds)
        )
    lines.append("n".ljust(width) + "".join(f"{anatomy[k].get('n', 0):>11}" for k in kinds))
    return "\n".join(lines)


def _seed(text: str) -> int:
    """``--seed``, checked as argparse reads it: before any data is built."""
    if not re.fullmatch(r"\d+", text.strip()) or int(text) > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"seed {text!r} must be an integer in [0, 4294967295]")
    return int(text)


STORE_HELP = "base URI of the store ($SRC_STORE_URI, else ./.src_store)"


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one to show (not for flags or unset options)."""

    def _get_help_string(self, action):
        default = action.default
        shown = not (default is None or default is False or default == [] or default == argparse.SUPPRESS)
        return f"{action.help} (default: %(default)s)" if action.option_strings and shown else action.help


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_HelpWithDefaults, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="src-calibrate",
        description="Runs the SRC loop through Dagster into a persistent instance, or scores a checkpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="materialize the whole graph: SFT, judge, then N iterations in order")
    p.add_argument("--iterations", type=int, default=2, help="SRC iterations after the SFT checkpoint")
    p.add_argument(
        "--profile", choices=sorted(PROFILES), default="default", help="named defaults; smoke: tiny sizes, seconds"
    )
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--seed", type=_seed, default=0, help="the seed setting: data, tiny models and training")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override any setting, e.g. --set tau=0.2 --set scoring=independent (src-calibrate settings lists them)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list on stdout")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show Dagster's event stream and the libraries' own output"
    )
    p.add_argument(
        "--executor",
        choices=("in_process", "multiprocess"),
        default="in_process",
        help="multiprocess: each step (each shard of candidate search and judging) in a process of its own",
    )
    p.add_argument(
        "--submit",
        action="store_true",
        help="queue the runs for a running dagster-daemon (deploy/dagster.yaml's run limits apply) instead of running "
        "them here",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="recompute everything: no SFT, judge or completed iteration of an earlier run is reused",
    )
    p.set_defaults(fn=run)
    e = sub.add_parser("evaluate", help="score a checkpoint on a freshly generated held-out set")
    e.add_argument(
        "--task",
        choices=("vqa", "caption"),
        default="vqa",
        help="vqa: answer the domain's questions; caption: describe each scene (a base-stage checkpoint)",
    )
    e.add_argument(
        "--anatomy",
        action="store_true",
        help="where the errors come from: exact listing, conclusion from listing, answer from conclusion, per kind",
    )
    e.add_argument(
        "--samples", type=int, default=6, help="with --anatomy: K samples per prompt for 'any correct and consistent'"
    )
    e.add_argument("--temperature", type=float, default=1.0, help="with --anatomy: the samples' temperature")
    e.add_argument("--checkpoint", required=True, help="a model directory, a store URI, or a hub id")
    e.add_argument("--store", help="the store holding s3:// checkpoints (default: $SRC_STORE_URI)")
    e.add_argument("--seed", type=_seed, default=12345, help="seed of the held-out scenes")
    e.add_argument("--n", type=int, default=500, help="held-out scenes generated (without --data)")
    e.add_argument(
        "--images",
        choices=("real", "blank"),
        default="real",
        help="blank: every image replaced by a blank one of the same size (does the policy use its image?)",
    )
    e.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    e.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on a GPU that supports it), float32, bfloat16, float16"
    )
    e.add_argument(
        "--data", help="score on your rows instead: a Parquet/JSON/JSONL file, a datasets folder, or a folder of them"
    )
    e.add_argument("--split", default="eval", help="with --data: the rows of this split")
    e.add_argument("--against", help="with --data: a second checkpoint; the judge's win rate of --checkpoint over it")
    e.add_argument(
        "--judge", default="verifier", help="with --against: a judge model directory, store URI or 'verifier'"
    )
    e.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --data: source settings, e.g. --set source_columns=question:prompt --set split_fractions=eval:1",
    )
    e.add_argument("--json", action="store_true", help="print the scores as JSON")
    e.set_defaults(fn=evaluate)
    o = sub.add_parser("export", help="an iteration's preference set as a Hugging Face dataset in TRL's columns")
    o.add_argument("--store", help=STORE_HELP)
    o.add_argument("--iteration", type=int, required=True, help="the iteration whose preference set to export")
    o.add_argument("--out", required=True, help="a new folder (read it with datasets.load_from_disk)")
    o.add_argument(
        "--all-pairs", action="store_true", help="dropped pairs too (their weight says why they were not kept)"
    )
    o.set_defaults(fn=export)
    c = sub.add_parser("store", help="the store's health").add_subparsers(dest="store_command", required=True)
    k = c.add_parser(
        "check",
        help="each model's current version against its manifest, and the leftovers of writes that never finished",
    )
    k.add_argument("--store", help=STORE_HELP)
    k.add_argument(
        "--sweep",
        type=float,
        metavar="HOURS",
        help="delete the leftovers older than HOURS (none are ever read; the age spares a write under way)",
    )
    k.set_defaults(fn=store_check)
    t = sub.add_parser("settings", help="every setting with its value, what it accepts, and what it does")
    t.add_argument("--profile", choices=sorted(PROFILES), default="default", help="show this profile's values")
    t.add_argument("--json", action="store_true", help="as a JSON list")
    t.set_defaults(fn=settings)
    x = sub.add_parser("experiment", help="the ablation table: each variant for each seed, as JSON and Markdown")
    x.add_argument("--seeds", type=_seed, nargs="+", default=[1, 2, 3], help="one run of every variant per seed")
    x.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS), help="the ablations to run"
    )
    x.add_argument("--iterations", type=int, default=2, help="SRC iterations per run")
    x.add_argument("--profile", choices=sorted(PROFILES), default="default", help="named defaults for every run")
    x.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="applied to every variant")
    x.add_argument("--out", default="experiments", help="folder for each run's store and the table (JSON and Markdown)")
    x.add_argument(
        "--parallel", type=int, default=1, help="seeds at a time (each run gets cores / parallel torch threads)"
    )
    x.set_defaults(fn=experiment)
    b = sub.add_parser("bench-generation", help="tokens/s and peak memory of candidate search and judging")
    b.add_argument("--prompts", type=int, default=64, help="prompts searched and judged")
    b.add_argument("--policy", help="a policy directory (default: the tiny LLaVA after a short SFT)")
    b.add_argument("--judge", help="a judge directory (with --policy)")
    b.add_argument("--sft-epochs", type=float, default=4.0, help="the default policy's SFT epochs (without --policy)")
    b.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    b.add_argument("--code", help="a checkout whose src_assets to time instead of this one (before/after comparisons)")
    b.add_argument("--out", help="also write the JSON rows here")
    b.set_defaults(fn=bench_generation)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from src_assets.models import ModelLoadError
    from src_assets.storage import StoreError

    try:
        return args.fn(args)
    except (StoreError, ModelLoadError) as e:  # a store or a checkpoint that cannot be used: one line, its cause
        print(f"src-calibrate: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into a reader that stopped (| head): no traceback, and none at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
