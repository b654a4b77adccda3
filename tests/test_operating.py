"""Operating SRC as a user does: the webserver and daemon on loopback, backfills through GraphQL, the UI in Chromium.

Everything runs on the smoke profile against a temporary DAGSTER_HOME (the repository's deploy/dagster.yaml) and store.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    RunsFilter,
    materialize,
)

from dagster_project.assets.partitions import iteration_partitions
from dagster_project.automation import ITERATION_ASSETS
from dagster_project.definitions import foundation_assets
from dagster_project.resources import SettingsResource, StoreResource, build_resources
from dagster_project.runs.launch import LOCATION
from src_assets.storage import Store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = Path(os.environ.get("SRC_TEST_ARTIFACTS", ROOT / "test-artifacts"))
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        out = json.loads(response.read())
    assert "errors" not in out, out["errors"]
    return out["data"]


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("operating")
    home, store = root / "home", root / "store"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    with DagsterInstance.from_config(str(home)):
        pass  # the databases exist before the webserver and the daemon open them together (they race on a fresh home)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "SRC_STORE_URI": str(store),
        "SRC_PROFILE": "smoke",
        "HF_HUB_OFFLINE": "1",
    }
    # `dg dev` as the README runs it, with the project's virtual environment active: it starts the webserver and
    # the daemon on the code location that pyproject.toml's [tool.dg] names.
    env["VIRTUAL_ENV"], env["PATH"] = str(BIN.parent), f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "dg_dev.log"
    logs = [open(log, "w")]
    procs = [
        subprocess.Popen(
            [str(BIN / "dg"), "dev", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=logs[0],
            stderr=subprocess.STDOUT,
        )
    ]
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise RuntimeError(f"the webserver did not come up: {log.read_text()[-3000:]}")
                time.sleep(1)
        with DagsterInstance.from_config(str(home)) as instance:
            # The unpartitioned assets (data, SFT, judge) first, as a user would from the UI.
            foundation = foundation_assets
            resources = build_resources(StoreResource(base_uri=str(store)), SettingsResource(profile="smoke"))
            assert materialize(foundation, instance=instance, resources=resources).success
        yield url, home, Store(str(store)), log
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()


def test_dg_dev_starts_the_ui_and_the_daemon_without_a_warning(dagster_ui):
    """Neither Dagster's "dagster.yaml in the current folder is ignored" nor dg's virtual-environment mismatch."""
    deadline = time.monotonic() + 120
    while "Instance is configured with the following daemons" not in (log := dagster_ui[3].read_text()):
        assert time.monotonic() < deadline, f"the daemon did not start: {log[-3000:]}"
        time.sleep(1)
    assert "Serving dagster-webserver" in log, log[-3000:]
    assert "WARNING" not in log and "does not match" not in log, log[-3000:]


def _repository(url: str) -> dict:
    data = _graphql(url, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")
    node = data["repositoriesOrError"]["nodes"][0]
    return {"repositoryName": node["name"], "repositoryLocationName": node["location"]["name"]}


def _backfill(url: str, instance, keys: list[str], timeout: float = 400) -> list:
    """Launches a backfill of the iteration job over ``keys`` through GraphQL; returns its runs once all finished."""
    mutation = """
    mutation($params: LaunchBackfillParams!) {
      launchPartitionBackfill(backfillParams: $params) {
        __typename
        ... on LaunchBackfillSuccess { backfillId }
        ... on PythonError { message }
      }
    }"""
    params = {
        "selector": {"partitionSetName": "src_iteration_partition_set", "repositorySelector": _repository(url)},
        "partitionNames": keys,
    }
    result = _graphql(url, mutation, {"params": params})["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    backfill_id = result["backfillId"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs(filters=RunsFilter(tags={"dagster/backfill": backfill_id}))
        if len(runs) == len(keys) and all(r.status in FINISHED for r in runs):
            return sorted(runs, key=lambda r: r.tags["dagster/partition"])
        time.sleep(2)
    raise AssertionError(
        f"backfill {backfill_id} did not finish in {timeout}s: {[(r.tags.get('dagster/partition'), r.status) for r in runs]}"
    )


@pytest.fixture(scope="module")
def backfilled(dagster_ui):
    url, home, store, _ = dagster_ui
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(iteration_partitions.name, ["001", "002"])
        runs = _backfill(url, instance, ["001", "002"])
    return url, home, store, runs


def test_backfill_runs_iterations_in_order(backfilled):
    url, home, store, runs = backfilled
    assert [r.tags["dagster/partition"] for r in runs] == ["001", "002"]
    assert all(r.status == DagsterRunStatus.SUCCESS for r in runs), [r.status for r in runs]
    with DagsterInstance.from_config(str(home)) as instance:
        for asset in ITERATION_ASSETS:
            assert {"001", "002"} <= instance.get_materialized_partitions(AssetKey(asset)), asset
        policy_1 = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("policy_checkpoint"), asset_partitions=["001"]), limit=1
        ).records[0]
        second_started = instance.get_run_stats(runs[1].run_id).start_time
    assert second_started >= policy_1.timestamp, "iteration 002 started before iteration 001's policy existed"


def test_backfill_of_an_iteration_whose_predecessor_is_gone_fails_clearly(backfilled):
    url, home, store, _ = backfilled
    store.delete("models/policy_checkpoint/002")
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(iteration_partitions.name, ["003"])
        (run,) = _backfill(url, instance, ["003"])
        assert run.status == DagsterRunStatus.FAILURE
        failures = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE)
    messages = " ".join(f.dagster_event.step_failure_data.error.to_string() for f in failures)
    assert "iteration 003 needs the policy of iteration 002" in messages
    assert "materialize iteration 002 first" in messages
    assert not store.exists("assets/candidate_pool/003.parquet")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("Chromium is not installed; .ci/run installs Debian's chromium package")
    pytest.skip("Chromium is not installed here (apt-get install chromium); CI runs this test")


def _dismiss_welcome(page):
    """The first visit shows a 'Join the Dagster community' dialog over the page; skip it."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=15_000)
        skip.click()
    except Exception:  # no dialog this time
        pass


def test_ui_shows_the_graph_and_iteration_eval_metadata(backfilled):
    url, _, _, _ = backfilled
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{url}/asset-groups", wait_until="domcontentloaded")
            _dismiss_welcome(page)
            page.get_by_text("Global asset lineage").first.wait_for(timeout=90_000)
            for group in ("data", "training", "iteration", "evaluation"):
                page.get_by_text(group, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "asset-groups.png"))
            # The graph around iteration_eval: its upstream chain back to the SFT checkpoint.
            page.goto(
                f"{url}/assets/iteration_eval?view=lineage&lineageScope=upstream&lineageDepth=5",
                wait_until="domcontentloaded",
            )
            for asset in ("iteration_eval", "policy_checkpoint", "preference_set"):
                page.get_by_text(asset, exact=True).first.wait_for(timeout=90_000)
            page.screenshot(path=str(ARTIFACTS / "asset-graph.png"))
            page.goto(f"{url}/assets/iteration_eval?view=events&partition=002", wait_until="domcontentloaded")
            _dismiss_welcome(page)
            page.get_by_text("judge_win_rate_vs_previous").first.wait_for(timeout=90_000)
            assert page.get_by_text("consistency").count() > 0
            page.screenshot(path=str(ARTIFACTS / "iteration_eval.png"), full_page=True)
            # The iteration job's Launchpad: its Partition box lists the iterations, the next one among them.
            page.goto(f"{url}/locations/{LOCATION}/jobs/src_iteration/playground", wait_until="domcontentloaded")
            _dismiss_welcome(page)
            page.get_by_placeholder("Partition").click(timeout=90_000)
            for key in ("001", "002", "003"):
                page.get_by_text(key, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "launchpad.png"))
        finally:
            browser.close()
    assert (ARTIFACTS / "iteration_eval.png").stat().st_size > 10_000
