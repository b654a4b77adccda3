"""One store for every artefact: a local directory by default, or ``s3://bucket/prefix``.

Tables are Parquet, JSON documents are JSON, checkpoints are Hugging Face model
directories. Every write is atomic:

- a file is written under a temporary name beside its target, then moved into
  place (a rename on local disk; on S3 the object only appears once complete);
- a model directory is uploaded to a fresh ``versions/<id>/`` folder, then its
  ``MANIFEST.json`` (every file's size and sha256) is written last, and only
  then is the ``CURRENT`` pointer rewritten (one atomic file write). A version
  without a manifest is not a version: an interrupted upload is never used,
  and the older version stays in place. Downloads are checked against the
  manifest, into a cache private to the user (``~/.cache``, mode 0700).

``create_exclusive`` writes a file only if none exists (``O_EXCL`` semantics: a hard link on local disk, a
conditional put, ``If-None-Match: *``, on S3): ``leases.py`` builds one writer at a time on it.

Credentials are never passed through here: s3fs reads them from the
environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, or an
instance role).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import fsspec
import polars as pl
from fsspec.implementations.local import LocalFileSystem

from .fingerprints import digest

DEFAULT_STORE = ".src_store"
MANIFEST = "MANIFEST.json"
STORE_ENV = "SRC_STORE_URI"
ENDPOINT_ENV = "SRC_S3_ENDPOINT_URL"


MODEL_CARD = "README.md"


class StoreError(RuntimeError):
    """A missing or unreadable artefact; the message names its URI."""


def _credentials_hint(error: Exception) -> str:
    """Where s3fs looks for credentials, after an error that says they are missing or refused."""
    if isinstance(error, PermissionError) or "Credentials" in type(error).__name__:
        return " (credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)"
    return ""


class Store:
    def __init__(self, base_uri: str | None = None, s3_endpoint_url: str | None = None, cache_dir: str | None = None):
        base_uri = base_uri or os.environ.get(STORE_ENV) or DEFAULT_STORE
        self.is_local = "://" not in base_uri or base_uri.startswith("file://")
        options = {}
        if base_uri.startswith("s3://"):
            endpoint = s3_endpoint_url or os.environ.get(ENDPOINT_ENV)
            if endpoint:
                options["endpoint_url"] = endpoint
            # Listings must reflect writes made a moment ago by this or another process.
            options["use_listings_cache"] = False
            options["skip_instance_cache"] = True
        elif self.is_local:
            base_uri = str(Path(base_uri.removeprefix("file://")).expanduser().resolve())
        try:
            self.fs, root = fsspec.core.url_to_fs(base_uri, **options)
        except (ValueError, ImportError) as e:  # an unknown scheme, or one whose filesystem is not installed
            raise StoreError(
                f"cannot open the store {base_uri!r} ({e}); a store is a local directory, file://... or "
                f"s3://bucket/prefix"
            ) from None
        if self.is_local and os.path.exists(root) and not os.path.isdir(root):
            raise StoreError(f"the store {root} is a file, not a directory")
        self.root = root.rstrip("/")
        self.base_uri = base_uri.rstrip("/")
        default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "src_calibration" / "models"
        self.cache_dir = Path(cache_dir or default_cache)

    def __repr__(self) -> str:
        return f"Store({self.base_uri!r})"

    def check_writable(self) -> None:
        """Raises ``StoreError`` naming the cause when this store cannot be written, and writes nothing: a local
        directory whose nearest existing folder is a file or not writable, or an object store that cannot be
        reached (see ``check_reachable``)."""
        if not self.is_local:
            return self.check_reachable()
        existing = Path(self.root)
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise StoreError(f"the store {self.root} cannot be made: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StoreError(f"the store {self.root} cannot be written: {existing} is not writable")

    def check_reachable(self) -> None:
        """Raises ``StoreError`` naming the cause when an object store refuses a read: missing or refused
        credentials, an endpoint that does not answer, a bucket that does not exist. A local store passes."""
        if self.is_local:
            return
        try:
            self.fs.exists(f"{self.root}/runs")  # a key, not a bare bucket, so that credential errors are raised
        except Exception as e:  # s3fs and botocore raise their own types for credentials and endpoints
            raise StoreError(
                f"the store {self.base_uri} cannot be used: {type(e).__name__}: {e}{_credentials_hint(e)}"
            ) from None
        bucket = self.root.split("/", 1)[0]
        if not self.fs.exists(bucket):
            raise StoreError(f"the store {self.base_uri} cannot be used: its bucket {bucket!r} does not exist")

    # -- paths ---------------------------------------------------------------
    def _path(self, key: str) -> str:
        key = key.strip("/")
        if not key or ".." in key.split("/"):
            raise StoreError(f"invalid store key {key!r}")
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        path = self._path(key)
        return path if self.is_local else f"{self.base_uri.split('://', 1)[0]}://{path}"

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def content_digests(self, keys: list[str], known: dict | None = None) -> dict[str, dict]:
        """Each file's sha256, with the size and modification time it was computed for: ``{key: {"stat", "sha256"}}``.
        A file whose size and time match its entry in ``known`` is not read again."""
        known, out = known or {}, {}
        for key in keys:
            info = self.fs.info(self._path(key))
            modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
            stat = f"{info.get('size')}/{modified}"
            previous = known.get(key)
            if isinstance(previous, dict) and previous.get("stat") == stat and "sha256" in previous:
                out[key] = previous
            else:
                out[key] = {"stat": stat, "sha256": hashlib.sha256(self.read_bytes(key)).hexdigest()}
        return out

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Keys (relative to the store) of the files under ``prefix`` ending with ``suffix``, sorted."""
        base = self._path(prefix)
        if not self.fs.exists(base):
            return []
        keys = []
        for path in self.fs.find(base):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(suffix) and not name.startswith(".tmp-"):
                keys.append(path[len(self.root) + 1 :])
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.is_local:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
            return
        # File by file: fsspec's rm reads [, * and ? in a path as a glob pattern, and keys hold brackets.
        for file in self.fs.find(path):
            self.fs.rm_file(file)

    # -- files ---------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> str:
        """Writes ``data`` whole or not at all. An object store's PUT already is (a reader sees the old object or the
        new one), so the bytes go straight to the key: fsspec's move would read the brackets a shard step's key holds
        as a glob pattern. A local file is written beside its key and renamed onto it."""
        path = self._path(key)
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return self.uri(key)
        parent, name = path.rsplit("/", 1)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        os.makedirs(parent, exist_ok=True)
        try:
            self.fs.pipe_file(tmp, data)
            os.replace(tmp, path)
        except OSError as e:
            if e.errno is None or e.filename is not None:
                raise
            # A full disk raises ENOSPC from write(), which names no file: name the artefact that did not fit.
            raise OSError(e.errno, e.strerror or str(e), self.uri(key)) from e
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return self.uri(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError as e:
            raise StoreError(f"{self.uri(key)} does not exist") from e

    def size(self, key: str) -> int:
        try:
            return int(self.fs.size(self._path(key)))
        except FileNotFoundError as e:
            raise StoreError(f"{self.uri(key)} does not exist") from e

    def open(self, key: str):
        """A binary file object for reading ``key`` piece by piece (Parquet row groups), not whole."""
        return self.fs.open(self._path(key), "rb")

    def write_table(self, key: str, df: pl.DataFrame) -> str:
        buf = io.BytesIO()
        df.write_parquet(buf)
        return self.write_bytes(key, buf.getvalue())

    def read_table(self, key: str) -> pl.DataFrame:
        data = self.read_bytes(key)
        try:
            return pl.read_parquet(io.BytesIO(data))
        except Exception as e:
            raise StoreError(f"{self.uri(key)} is not a readable Parquet file: {e}") from e

    def write_json(self, key: str, value) -> str:
        return self.write_bytes(key, json.dumps(value, indent=1, sort_keys=True).encode())

    def read_json(self, key: str):
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"{self.uri(key)} is not valid JSON ({e}); was it written by hand or cut short?") from e

    # -- one-writer primitives (leases.py builds leases on them) -------------------
    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Writes ``key`` only if it does not exist; False if it does. The file appears whole or not at all."""
        path = self._path(key)
        if not self.is_local:
            try:
                self.fs.pipe_file(path, data, mode="create")  # PutObject with If-None-Match: *
                return True
            except FileExistsError:
                return False
            except OSError as e:  # a bucket that is gone, credentials that may read but not write
                raise StoreError(
                    f"{self.uri(key)} cannot be written: {type(e).__name__}: {e}{_credentials_hint(e)}"
                ) from None
        parent = path.rsplit("/", 1)[0]
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # fails if the file exists, atomically, like O_EXCL, but never leaves it half-written
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def modified(self, key: str) -> float | None:
        """When ``key`` was last written (seconds since the epoch), where the filesystem says."""
        try:
            return self.fs.modified(self._path(key)).timestamp()
        except (FileNotFoundError, NotImplementedError, AttributeError):
            return None

    # -- model directories ---------------------------------------------------
    def put_model(self, key: str, local_dir: str | Path) -> str:
        """Uploads a model directory as a new version of ``key``, its manifest last, and makes it current. A
        directory whose files (names, sizes and sha256 sums) are those of the current version is not uploaded
        again: the current version is returned (a rerun after a kill makes no duplicate version)."""
        local_dir = Path(local_dir)
        if not (local_dir / "config.json").is_file():
            raise StoreError(f"{local_dir} is not a model directory (no config.json)")
        card = local_dir / MODEL_CARD
        # A model card (README.md) is not part of a version: it is written beside it, and evaluation adds to it.
        local = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST and p != card)
        files = {
            file.relative_to(local_dir).as_posix(): {"size": file.stat().st_size, "sha256": _sha256(file)}
            for file in local
        }
        current = self.current_model(key)
        if current is not None and self._same_files(current, files):
            return current
        version = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        target = self._path(f"{key}/versions/{version}")
        for file, name in zip(local, files):
            dest = f"{target}/{name}"
            if self.is_local:
                os.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(file), dest)
        self.write_json(f"{key}/versions/{version}/{MANIFEST}", {"files": files})
        self.write_json(f"{key}/CURRENT", {"version": version})
        return self.uri(f"{key}/versions/{version}")

    def verify_version(self, uri: str) -> dict:
        """The manifest of the stored version at ``uri``, once its files match it: sha256 sums on local disk, sizes
        on an object store (summing there means downloading; ``local_model_dir`` sums what it downloads). Else
        ``StoreError`` naming the file."""
        fs, path = self._filesystem_of(uri)
        files = self._manifest(path, uri, fs)
        if isinstance(fs, LocalFileSystem):
            _check_files(Path(path), files, uri)
            return files
        sizes = {info["name"]: info["size"] for info in fs.find(path, detail=True).values()}
        for name, expected in files.items():
            if sizes.get(f"{path}/{name}") != expected["size"]:
                found = sizes.get(f"{path}/{name}", "missing")
                raise StoreError(
                    f"{uri}/{name} does not match its manifest (size {found}, expected {expected['size']}): "
                    f"the checkpoint is truncated or was changed"
                )
        return files

    def _same_files(self, uri: str, files: dict) -> bool:
        """Whether the stored version at ``uri`` holds exactly ``files`` (``verify_version``)."""
        try:
            return self.verify_version(uri) == files
        except StoreError:  # no manifest, an unreadable one, or files that do not match it: upload anew
            return False

    def write_model_card(self, uri: str, text: str) -> None:
        """Writes (or rewrites) the model card of the stored version at ``uri``; the manifest does not list it."""
        if not uri.startswith(self.base_uri + "/"):
            raise StoreError(f"{uri} is not a model version of this store ({self.base_uri})")
        self.write_bytes(f"{uri[len(self.base_uri) + 1 :]}/{MODEL_CARD}", text.encode())

    def current_model(self, key: str) -> str | None:
        """URI of the committed version of ``key``, or None when none was ever committed."""
        if not self.exists(f"{key}/CURRENT"):
            return None
        pointer = self.read_json(f"{key}/CURRENT")
        if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
            raise StoreError(f"{self.uri(key + '/CURRENT')} does not name a version: {str(pointer)[:80]!r}")
        return self.uri(f"{key}/versions/{pointer['version']}")

    def _filesystem_of(self, uri: str):
        """The filesystem and path of ``uri``: this store's own for its scheme, else one opened for the URI."""
        if "://" not in uri:
            return fsspec.filesystem("file"), uri
        if uri.split("://", 1)[0] == self.base_uri.split("://", 1)[0]:
            return self.fs, uri.split("://", 1)[1]
        try:
            return fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError) as e:
            raise StoreError(f"cannot open {uri!r} ({e})") from None

    def current_version(self, reference: str) -> str:
        """``reference`` itself, or, when it is a model asset's folder (one holding ``CURRENT``), the URI of its
        current version: ``evaluate --checkpoint .src_store/models/sft_checkpoint`` means the current SFT."""
        fs, path = self._filesystem_of(reference)
        path = path.rstrip("/")
        if not fs.isfile(f"{path}/CURRENT"):
            return reference
        try:
            version = json.loads(fs.cat_file(f"{path}/CURRENT"))["version"]
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{reference.rstrip('/')}/CURRENT does not name a version ({e})") from None
        return f"{reference.rstrip('/')}/versions/{version}"

    def _manifest(self, path: str, uri: str, fs) -> dict:
        """A stored version's manifest, read through ``fs``, or StoreError: without one the version was never
        completed."""
        try:
            files = json.loads(fs.cat_file(f"{path}/{MANIFEST}"))["files"]
        except FileNotFoundError as e:
            if not fs.exists(path):
                raise StoreError(f"{uri} does not exist") from None
            raise StoreError(f"{uri} has no {MANIFEST}: its upload never completed, so it is not used") from e
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{uri}/{MANIFEST} is unreadable ({e})") from e
        return files

    def local_model_dir(self, uri: str) -> str:
        """A local directory holding the model at ``uri``.

        A directory outside the store (your own model) is used as it is. A store version (a directory in a
        ``versions/`` folder, of this store or any other named by its path) is used in place once its files match
        its manifest's sizes and sha256 sums; one in a remote store is downloaded into the private cache and
        checked the same way, at every use. A file's sum is computed once per process for its size and mtime."""
        if "://" not in uri:
            if not Path(uri, "config.json").is_file():
                raise StoreError(f"{uri} is not a model directory (no config.json)")
            if Path(uri).resolve().parent.name == "versions":
                _check_files(Path(uri), self._manifest(uri, uri, fsspec.filesystem("file")), uri)
            return uri
        fs, path = self._filesystem_of(uri)
        files = self._manifest(path, uri, fs)
        local = self.cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:24]
        if local.is_dir():
            try:
                _check_files(local, files, uri)
                return str(local)
            except StoreError:
                shutil.rmtree(local, ignore_errors=True)  # a stale or planted copy: download it again
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.cache_dir, 0o700)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=self.cache_dir))
        try:
            for name in files:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{path}/{name}", str(tmp / name))
            _check_files(tmp, files, uri)
            (tmp / MANIFEST).write_text(json.dumps({"files": files}))
            tmp.rename(local)
        except OSError:
            if not local.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(local)


def _sha256(file: Path) -> str:
    sha = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


_SUMS: dict[tuple[str, int, int], str] = {}


def _sha256_cached(file: Path) -> str:
    """``_sha256``, remembered for the file's path, size and mtime: a model is hashed once per process, not at
    every load (a 7B checkpoint takes tens of seconds). A change that keeps both size and mtime goes unseen."""
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SUMS:
        _SUMS[key] = _sha256(file)
    return _SUMS[key]


def directory_digest(directory: str | Path) -> str:
    """A digest of a directory's content (every file's name and sha256): what reuse fingerprints use for a model
    directory of yours, so that weights changed in place are noticed although the path is the same."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    return digest([(file.relative_to(directory).as_posix(), _sha256_cached(file)) for file in files], length=16)


def _check_files(directory: Path, files: dict, uri: str) -> None:
    """Every manifest file is there with its size and sha256; else StoreError naming it."""
    for name, expected in files.items():
        file = directory / name
        if not file.is_file() or file.stat().st_size != expected["size"]:
            found = file.stat().st_size if file.is_file() else "missing"
            raise StoreError(
                f"{uri}/{name} does not match its manifest (size {found}, expected {expected['size']}): "
                f"the checkpoint is truncated or was changed"
            )
        if _sha256_cached(file) != expected["sha256"]:
            raise StoreError(
                f"{uri}/{name} does not match its manifest's sha256: the checkpoint is corrupt or was changed"
            )
