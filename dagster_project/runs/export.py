"""``src-calibrate export``: an iteration's preference set as a Hugging Face dataset in TRL's columns."""

from pathlib import Path

from .run import usage_error


def export(args) -> int:
    """``export``: an iteration's preference set as a Hugging Face dataset in TRL's columns."""
    from src_assets.export import export_preference_set
    from src_assets.storage import Store

    from .. import store_layout
    from ..assets.partitions import iteration_key

    if args.iteration < 1:
        return usage_error(f"--iteration must be >= 1 (got {args.iteration})")
    store = Store(args.store) if args.store else Store()
    store.check_reachable()
    key = store_layout.asset_table("preference_set", iteration_key(args.iteration))
    if not store.exists(key):
        return usage_error(f"{store.uri(key)} does not exist: iteration {args.iteration} has no preference set")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        return usage_error(f"{out} exists and is not empty; give --out a new folder")
    dataset = export_preference_set(store.read_table(key), out, kept_only=not args.all_pairs)
    print(f"{dataset.num_rows} pairs -> {out} (datasets.load_from_disk; columns {dataset.column_names})")
    return 0
