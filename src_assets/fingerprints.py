"""Stable fingerprints: what reuse, code versions, sensor run keys and random streams are keyed by.

``digest`` is the project's one digest of values (JSON, sorted keys, sha256). ``derive_seed`` gives each random
stream its own seed from the run's ``seed`` and labels that name the stream (``derive_seed(seed,
"candidate_pool", "002")``), so streams never collide the way ``seed + 7919`` and ``seed * 1000 + k`` could.
"""

from __future__ import annotations

import hashlib
import json

import polars as pl


def digest(*parts, length: int = 12) -> str:
    """A short, stable digest of JSON-able parts (settings, recipes, table digests, file sums)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


def table_digest(df: pl.DataFrame) -> str:
    """A digest of a table's rows (polars' row hashes, summed: the same rows in the same order give the same)."""
    return str(int(df.hash_rows(seed=0).cast(pl.UInt64).sum()))


def derive_seed(seed: int, *labels) -> int:
    """A 32-bit seed for the random stream ``labels`` name, derived from the run's ``seed``."""
    return int(digest(seed, *labels, length=8), 16)
