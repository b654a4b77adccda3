import os
import time
from pathlib import Path

import polars as pl
import pytest

from src_assets.leases import MAX_LEASE_TTL_S, LeaseHeld, acquire_lease
from src_assets.storage import Store, StoreError


def _stores(tmp_path, s3_endpoint):
    return {
        "local": Store(str(tmp_path / "store")),
        "s3": Store("s3://src-test/run-prefix", s3_endpoint_url=s3_endpoint),
    }


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return Store(f"s3://src-test/{tmp_path.name}", s3_endpoint_url=endpoint, cache_dir=str(tmp_path / "cache"))


def test_tables_and_json_round_trip(store):
    df = pl.DataFrame({"id": ["a", "b"], "image": [b"\x89PNG", b""], "score": [0.5, 1.0]})
    uri = store.write_table("assets/x.parquet", df)
    assert uri.endswith("assets/x.parquet")
    assert store.read_table("assets/x.parquet").equals(df)
    store.write_json("assets/y.json", {"k": [1, 2]})
    assert store.read_json("assets/y.json") == {"k": [1, 2]}
    assert store.list("assets") == ["assets/x.parquet", "assets/y.json"]
    assert store.list("assets", ".parquet") == ["assets/x.parquet"]
    assert store.list("nothing-here") == []


def test_missing_artefact_error_names_its_uri(store):
    with pytest.raises(StoreError, match="assets/missing.parquet does not exist"):
        store.read_table("assets/missing.parquet")


def test_interrupted_file_write_keeps_the_old_version(store, monkeypatch):
    store.write_json("assets/a.json", {"v": 1})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between write and commit")

    if store.is_local:  # killed after the bytes were written beside the key, before the rename onto it
        monkeypatch.setattr("src_assets.storage.os.replace", killed)
    else:  # killed during the PUT itself
        monkeypatch.setattr(store.fs, "pipe_file", killed)
    with pytest.raises(KeyboardInterrupt):
        store.write_json("assets/a.json", {"v": 2})
    monkeypatch.undo()
    assert store.read_json("assets/a.json") == {"v": 1}
    assert store.list("assets") == ["assets/a.json"]  # the aside copy was cleaned up


def _upload_dies_on_third_file(store, model_dir, monkeypatch):
    """``put_model`` with the connection lost at the third file it uploads."""
    original, calls = store.fs.put_file, []

    def dies_on_third_file(src, dst, **kwargs):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("connection reset")
        return original(src, dst, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", dies_on_third_file)
    with pytest.raises(OSError):
        store.put_model("models/judge", model_dir)
    monkeypatch.undo()


def _changed_copy(model_dir, tmp_path) -> Path:
    """A copy of a model directory with other weights (one value changed)."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "changed"
    shutil.copytree(model_dir, copy)
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_model_versions_commit_atomically(store, tiny_dirs, monkeypatch, tmp_path):
    first = store.put_model("models/judge", tiny_dirs[1])
    assert store.current_model("models/judge") == first

    judge_dir = _changed_copy(tiny_dirs[1], tmp_path)
    _upload_dies_on_third_file(store, judge_dir, monkeypatch)
    assert store.current_model("models/judge") == first  # the half-uploaded version is never current

    second = store.put_model("models/judge", judge_dir)
    assert second != first and store.current_model("models/judge") == second
    local = store.local_model_dir(second)
    from src_assets.models import load_judge_model

    model, tok = load_judge_model(local)
    assert model.config.vocab_size == len(tok)
    assert store.local_model_dir(first)  # the older version is still there


def test_an_identical_upload_is_the_current_version_and_a_changed_or_damaged_one_is_new(store, tiny_dirs, tmp_path):
    """A rerun after a kill uploads the same weights again: no duplicate version. Other weights, or a current
    version whose stored files no longer match its manifest, make a new one."""
    first = store.put_model("models/judge", tiny_dirs[1])
    assert store.put_model("models/judge", tiny_dirs[1]) == first
    assert _versions(store, "models/judge") == [first.rsplit("/", 1)[-1]]
    changed = store.put_model("models/judge", _changed_copy(tiny_dirs[1], tmp_path))
    assert changed != first and store.current_model("models/judge") == changed
    stored = store._path(f"models/judge/versions/{changed.rsplit('/', 1)[-1]}/model.safetensors")
    store.fs.pipe_file(stored, store.fs.cat_file(stored)[:100])  # truncated in place
    again = store.put_model("models/judge", tmp_path / "changed")
    assert again not in (first, changed) and store.local_model_dir(again)


def test_no_model_means_no_current_version(store):
    assert store.current_model("models/never") is None


def test_put_model_refuses_a_non_model_directory(store, tmp_path):
    with pytest.raises(StoreError, match="no config.json"):
        store.put_model("models/x", tmp_path)


def test_store_uri_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SRC_STORE_URI", str(tmp_path / "from-env"))
    assert Store().base_uri == str(tmp_path / "from-env")


def test_keys_cannot_escape_the_store(tmp_path):
    with pytest.raises(StoreError, match="invalid store key"):
        Store(str(tmp_path)).write_json("../outside.json", {})


def _versions(store, key):
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store._path(f"{key}/versions")))


def test_a_version_whose_upload_died_is_never_used(store, tiny_dirs, monkeypatch):
    """Files uploaded but no manifest (it is written last): the version is refused even when named directly."""
    _upload_dies_on_third_file(store, tiny_dirs[1], monkeypatch)
    (partial,) = _versions(store, "models/judge")
    assert store.exists(f"models/judge/versions/{partial}/config.json")  # config.json alone once passed as complete
    with pytest.raises(StoreError, match="has no MANIFEST.json: its upload never completed"):
        store.local_model_dir(store.uri(f"models/judge/versions/{partial}"))


def test_a_truncated_checkpoint_is_refused_naming_the_file(store, tiny_dirs):
    uri = store.put_model("models/judge", tiny_dirs[1])
    path = store._path("models/judge/versions/" + uri.rstrip("/").rsplit("/", 1)[-1] + "/model.safetensors")
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[: len(data) // 2])
    with pytest.raises(StoreError, match="model.safetensors does not match its manifest"):
        store.local_model_dir(uri)


def test_a_same_size_change_to_a_stored_version_fails_its_sha256(tiny_dirs, tmp_path):
    store = Store(str(tmp_path / "store"))  # a local store's versions are used in place (a remote one: test below)
    uri = store.put_model("models/judge", tiny_dirs[1])
    store.local_model_dir(uri)  # verified once: the sums are remembered for each file's size and mtime
    path = Path(store._path("models/judge/versions/" + uri.rstrip("/").rsplit("/", 1)[-1] + "/config.json"))
    path.write_bytes(path.read_bytes().replace(b"{", b"[", 1))
    with pytest.raises(StoreError, match="config.json does not match its manifest's sha256"):
        store.local_model_dir(uri)


def test_a_version_folder_without_manifest_is_refused_whichever_store_names_it(store, tiny_dirs, tmp_path):
    """A directory in a ``versions/`` folder is a store version: named by its path, from any store, it needs its
    manifest. Your own model directory needs none."""
    import shutil

    copy = tmp_path / "elsewhere" / "models" / "sft_checkpoint" / "versions" / "20260101T000000-deadbeef"
    shutil.copytree(tiny_dirs[0], copy)
    with pytest.raises(StoreError, match="has no MANIFEST.json: its upload never completed"):
        store.local_model_dir(str(copy))
    assert store.local_model_dir(str(tiny_dirs[0])) == str(tiny_dirs[0])


def test_a_directory_digest_follows_the_content_not_the_path(tiny_dirs, tmp_path):
    import shutil

    from src_assets.storage import directory_digest

    shutil.copytree(tiny_dirs[1], tmp_path / "judge")
    before = directory_digest(tmp_path / "judge")
    assert before == directory_digest(tiny_dirs[1])
    config = tmp_path / "judge" / "config.json"
    config.write_bytes(config.read_bytes().replace(b"{", b"[", 1))  # same size, same path
    assert directory_digest(tmp_path / "judge") != before


def test_a_current_pointer_that_is_not_json_names_its_path(store, tiny_dirs):
    store.put_model("models/judge", tiny_dirs[1])
    store.write_bytes("models/judge/CURRENT", b"{half a pointer")
    with pytest.raises(StoreError, match="models/judge/CURRENT is not valid JSON"):
        store.current_model("models/judge")


def test_remote_checkpoints_are_verified_into_a_private_cache(s3_endpoint, tiny_dirs, tmp_path):
    import os
    import stat

    store = Store(f"s3://src-test/{tmp_path.name}", s3_endpoint_url=s3_endpoint, cache_dir=str(tmp_path / "cache"))
    uri = store.put_model("models/judge", tiny_dirs[1])
    local = store.local_model_dir(uri)
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    # A directory planted where the cached copy goes is not trusted: it is replaced by a verified download.
    import shutil

    shutil.rmtree(local)
    os.makedirs(local)
    (tmp_path / "cache" / os.path.basename(local) / "config.json").write_text("{}")
    again = store.local_model_dir(uri)
    assert again == local and os.path.getsize(os.path.join(local, "model.safetensors")) > 1000
    # A same-size change to the cached copy fails its sha256 check at the next use: it is downloaded again.
    cached = Path(local, "config.json")
    original = cached.read_bytes()
    cached.write_bytes(original.replace(b"{", b"[", 1))
    assert store.local_model_dir(uri) == local and cached.read_bytes() == original
    # A remote file changed after its manifest was written fails the sha256 check.
    version = uri.rstrip("/").rsplit("/", 1)[-1]
    path = store._path(f"models/judge/versions/{version}/config.json")
    text = store.fs.cat_file(path)
    store.fs.pipe_file(path, text.replace(b"{", b"[", 1))  # same size, different bytes
    shutil.rmtree(local)
    with pytest.raises(StoreError, match="config.json does not match its manifest's sha256"):
        store.local_model_dir(uri)


def test_the_default_model_cache_is_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Store(str(tmp_path / "store")).cache_dir == tmp_path / "xdg" / "src_calibration" / "models"


# -- one writer at a time ---------------------------------------------------------------------------------------


def test_a_lease_has_one_holder_until_it_is_released(store):

    first = acquire_lease(store, "leases/iteration/001.json", "run-a", ttl_s=60)
    with pytest.raises(LeaseHeld, match=r"leases/iteration/001.json is held by run-a \(host .*, pid \d+, since"):
        acquire_lease(store, "leases/iteration/001.json", "run-b", ttl_s=60)
    again = acquire_lease(store, "leases/iteration/001.json", "run-a", ttl_s=60)  # the same run's next step
    again.release()
    assert store.read_json("leases/iteration/001.json")["owner"] == "run-a"  # still held: the first holder releases it
    first.release()
    assert not store.exists("leases/iteration/001.json")
    with acquire_lease(store, "leases/iteration/001.json", "run-b", ttl_s=60):
        assert store.read_json("leases/iteration/001.json")["owner"] == "run-b"
    assert not store.exists("leases/iteration/001.json")


def test_a_lease_whose_holder_died_is_taken_over(store):
    import socket
    import subprocess
    import time

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no process has any more
    here = {
        "owner": "run-dead",
        "host": socket.gethostname(),
        "pid": dead.pid,
        "acquired": time.time(),
        "heartbeat": time.time(),
        "ttl_s": 60,
    }
    store.write_json("leases/a.json", here)
    with acquire_lease(store, "leases/a.json", "run-new", ttl_s=60):
        assert store.read_json("leases/a.json")["owner"] == "run-new"
    # On another host only the heartbeat tells: a fresh one is respected, one older than its TTL is not.

    elsewhere = {**here, "host": "another-host", "pid": 1}
    store.write_json("leases/b.json", elsewhere)
    with pytest.raises(LeaseHeld, match="held by run-dead"):
        acquire_lease(store, "leases/b.json", "run-new", ttl_s=60)
    store.write_json("leases/b.json", {**elsewhere, "heartbeat": time.time() - 61})
    with acquire_lease(store, "leases/b.json", "run-new", ttl_s=60):
        pass


def test_the_holder_heartbeat_keeps_a_lease_fresh(tmp_path):
    import time

    store = Store(str(tmp_path / "store"))
    with acquire_lease(store, "leases/x.json", "run-a", ttl_s=0.5):
        first = store.read_json("leases/x.json")["heartbeat"]
        time.sleep(0.6)
        assert store.read_json("leases/x.json")["heartbeat"] > first  # beats every ttl/5

        with pytest.raises(LeaseHeld):
            acquire_lease(store, "leases/x.json", "run-b", ttl_s=0.5)


def test_an_s3_server_stopped_mid_upload_leaves_no_version_that_is_ever_used(tiny_dirs, tmp_path):
    """A real S3 server (moto's, on loopback) stopped after the second file of an upload, then restarted with
    its data: the half-uploaded version is never current, never downloaded, and the next upload commits."""
    import boto3
    from moto.server import ThreadedMotoServer

    from src_assets.models import load_judge_model

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import os

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="stopped-mid-upload")
    store = Store("s3://stopped-mid-upload/p", s3_endpoint_url=endpoint, cache_dir=str(tmp_path / "cache"))
    try:
        first = store.put_model("models/judge", tiny_dirs[1])
        original, uploaded = store.fs.put_file, []

        def server_stops_after_two_files(src, dst, **kwargs):
            if len(uploaded) == 2:
                server.stop()
            uploaded.append(dst)
            return original(src, dst, **kwargs)

        store.fs.put_file = server_stops_after_two_files
        changed = _changed_copy(tiny_dirs[1], tmp_path)
        with pytest.raises(Exception) as died:
            store.put_model("models/judge", changed)
        assert "connect" in str(died.value).lower()
        del store.fs.put_file
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # same data, same port
        server.start()
        fresh = Store("s3://stopped-mid-upload/p", s3_endpoint_url=endpoint, cache_dir=str(tmp_path / "cache2"))
        versions = _versions(fresh, "models/judge")
        assert len(versions) == 2 and fresh.current_model("models/judge") == first
        (partial,) = [v for v in versions if not first.endswith(v)]
        with pytest.raises(StoreError, match="has no MANIFEST.json"):
            fresh.local_model_dir(fresh.uri(f"models/judge/versions/{partial}"))
        assert not any((tmp_path / "cache2").glob("*/config.json"))  # nothing of it was cached
        second = fresh.put_model("models/judge", changed)
        assert second != first and fresh.current_model("models/judge") == second
        model, tokenizer = load_judge_model(fresh.local_model_dir(second))
        assert model.config.vocab_size == len(tokenizer)
    finally:
        server.stop()


@pytest.mark.parametrize("heartbeat", [time.time() + 86_400, float("nan"), "soon", None])
def test_a_lease_with_a_heartbeat_that_cannot_be_trusted_is_stale_once_its_file_is_older_than_the_ttl(
    heartbeat, tmp_path
):
    """A future heartbeat (clock skew), NaN, a string or garbage JSON: the lease file's age on the local clock
    decides, and every message names the lease's path."""

    store = Store(str(tmp_path / "store"))
    key = "leases/iteration/001.json"
    if heartbeat is None:
        store.write_bytes(key, b"{not json")
    else:
        store.write_json(
            key,
            {
                "owner": "run-x",
                "host": "another-host",
                "pid": 1,
                "acquired": time.time(),
                "heartbeat": heartbeat,
                "ttl_s": 60,
            },
        )
    with pytest.raises(
        LeaseHeld, match=r"store/leases/iteration/001.json (is held by run-x|is unreadable or incomplete)"
    ):
        acquire_lease(store, key, "run-new", ttl_s=60)
    old = time.time() - 400  # older than the record's TTL (60 s) and the default one (300 s)
    os.utime(tmp_path / "store" / key, (old, old))
    with acquire_lease(store, key, "run-new", ttl_s=60):
        assert store.read_json(key)["owner"] == "run-new"


@pytest.mark.parametrize("name", ["candidate_pool.search_shard[prompts_0_8]", "a*b?c", "{x,y}"])
def test_s3_keys_with_glob_characters_are_written_read_listed_and_deleted_as_they_are(s3_endpoint, tmp_path, name):
    """A shard step's key holds brackets; s3fs reads [, *, ? and { as glob patterns in moves and removals, so no
    store operation may pass a key through one."""
    store = Store(f"s3://src-test/{tmp_path.name}", s3_endpoint_url=s3_endpoint)
    key = f"assets/{name}/result.parquet"
    store.write_table(key, pl.DataFrame({"x": [1, 2]}))
    assert store.exists(key) and store.read_table(key)["x"].to_list() == [1, 2]
    assert store.list("assets") == [key]  # no temporary file is left beside it
    store.write_bytes(key, b"again")  # an overwrite
    assert store.read_bytes(key) == b"again"
    store.delete(f"assets/{name}")
    assert not store.exists(key) and store.list("assets") == []


def test_a_held_lease_says_when_it_expires_and_no_record_holds_one_beyond_the_cap(tmp_path):
    """A lease's expiry is its last heartbeat plus its TTL, capped at MAX_LEASE_TTL_S whatever its record says; the
    refusal names the holder and that time, and an unreadable record is shown as it is."""

    store = Store(str(tmp_path / "store"))
    beat = time.time() - MAX_LEASE_TTL_S / 2
    record = {"owner": "run-x", "host": "another-host", "pid": 1, "acquired": beat, "heartbeat": beat, "ttl_s": 1e12}
    store.write_json("leases/a.json", record)
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(beat + MAX_LEASE_TTL_S))
    with pytest.raises(
        LeaseHeld, match=rf"held by run-x \(host another-host, pid 1, since .*; it expires at {expires}"
    ):
        acquire_lease(store, "leases/a.json", "run-new", ttl_s=60)
    old = time.time() - MAX_LEASE_TTL_S - 1
    store.write_json("leases/a.json", {**record, "acquired": old, "heartbeat": old})  # ttl_s 1e12, capped
    with acquire_lease(store, "leases/a.json", "run-new", ttl_s=60):
        assert store.read_json("leases/a.json")["owner"] == "run-new"
    store.write_bytes("leases/b.json", b"{'owner': garbage")
    with pytest.raises(LeaseHeld, match=r"leases/b.json is unreadable or incomplete \(\"{'owner': garbage\"\)"):
        acquire_lease(store, "leases/b.json", "run-new", ttl_s=60)


def test_store_check_verifies_each_current_version_and_sweeps_only_old_leftovers(
    store, s3_endpoint, tiny_dirs, tmp_path, monkeypatch, capsys
):
    """Through the CLI: a good model is ok, a current version damaged in place is broken (exit 1), and an upload
    cut short and a write's temporary file are leftovers, deleted by --sweep only once older than its age."""
    from dagster_project.runs.cli import main

    uri = store.base_uri
    good = store.put_model("models/sft_checkpoint", tiny_dirs[0])
    damaged = store.put_model("models/policy_checkpoint/001", tiny_dirs[1])
    stored = store._path(f"models/policy_checkpoint/001/versions/{damaged.rsplit('/', 1)[-1]}/model.safetensors")
    store.fs.pipe_file(stored, store.fs.cat_file(stored)[:100])
    _upload_dies_on_third_file(store, _changed_copy(tiny_dirs[1], tmp_path), monkeypatch)
    store.write_json("assets/eval_set.json", {})
    store.fs.pipe_file(store._path("assets/.tmp-0123-preference_set.parquet"), b"cut short")
    monkeypatch.setenv("SRC_S3_ENDPOINT_URL", s3_endpoint)  # the command's store, on the local S3 server

    assert main(["store", "check", "--store", uri]) == 1
    out = capsys.readouterr().out.splitlines()
    damaged_line, good_line = out[:2]  # in key order
    assert damaged_line.startswith("models/policy_checkpoint/001 ") and "broken: " in damaged_line
    assert "model.safetensors does not match its manifest (size 100," in damaged_line
    assert good_line.startswith("models/sft_checkpoint ") and good_line.endswith(f"ok  {good.rsplit('/', 1)[-1]}")
    leftovers = [line for line in out if "h old (left)" in line]
    assert len(leftovers) == 2
    assert any(line.startswith("models/judge/versions/") and "without MANIFEST.json" in line for line in leftovers)
    assert any(line.startswith("assets/.tmp-0123-preference_set.parquet: a temporary file") for line in leftovers)
    assert out[-1] == "2 models: 1 ok, 1 broken; 2 leftover(s), 0 swept; --sweep HOURS deletes those older than HOURS"

    assert main(["store", "check", "--store", uri, "--sweep", "1"]) == 1  # both are seconds old: kept
    assert capsys.readouterr().out.splitlines()[-1].endswith("2 leftover(s), 0 swept")
    time.sleep(1.1)
    assert main(["store", "check", "--store", uri, "--sweep", "0.0002"]) == 1  # older than 0.72 s: swept
    assert capsys.readouterr().out.splitlines()[-1].endswith("2 leftover(s), 2 swept")
    assert not store.exists("assets/.tmp-0123-preference_set.parquet")
    assert store.list("models/judge") == []
    assert store.local_model_dir(good)  # a current version is never swept
