"""``src-calibrate store check``: a store's health."""

from .run import usage_error


def store_check(args) -> int:
    """``store check``: each model's current version against its manifest, and the leftovers of writes that
    never finished; ``--sweep HOURS`` deletes the leftovers older than that. Exit 1 when a current version is
    broken."""
    from src_assets.storage import Store
    from src_assets.store_check import check_store, sweep

    if args.sweep is not None and not args.sweep >= 0:
        return usage_error(f"--sweep takes hours >= 0 (got {args.sweep})")
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
