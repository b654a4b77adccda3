"""``src-calibrate``: runs the pipeline through Dagster into a persistent instance.

The runs land in ``$DAGSTER_HOME`` (default ``./.dagster_home``), so
``dagster dev`` shows their history, metadata and checks afterwards.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from src_assets.config import PROFILES


def _instance():
    from dagster import DagsterInstance

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").touch(exist_ok=True)
    return DagsterInstance.get()


def run(args) -> int:
    from dagster import materialize

    from .definitions import all_assets, build_resources
    from .resources import SettingsResource, StoreResource

    store = StoreResource(base_uri=args.store) if args.store else StoreResource()
    resources = build_resources(store, SettingsResource(profile=args.profile, seed=args.seed))
    result = materialize(all_assets, instance=_instance(), resources=resources, raise_on_error=False)
    rows = []
    for event in result.get_asset_materialization_events():
        meta = event.materialization.metadata
        row = {"asset": event.asset_key.to_user_string()}
        if "rows" in meta:
            row["rows"] = meta["rows"].value
        if "model" in meta:
            row["model"] = meta["model"].value
        row["stored_at"] = meta["stored_at"].value if "stored_at" in meta else None
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'asset':<22} {'rows':>6}  stored at")
        for r in rows:
            print(f"{r['asset']:<22} {r.get('rows', ''):>6}  {r.get('model') or r['stored_at']}")
        print(f"run {result.run_id} in DAGSTER_HOME={os.environ['DAGSTER_HOME']}")
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                print(f"step {event.step_key} failed: {event.step_failure_data.error.message.strip()}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="src-calibrate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="materialize the pipeline")
    p.add_argument("--profile", choices=sorted(PROFILES), default="default")
    p.add_argument("--store", help="base URI of the store (default: $SRC_STORE_URI or ./.src_store)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
