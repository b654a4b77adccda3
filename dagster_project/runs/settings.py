"""``src-calibrate settings``: every setting with its value, what it accepts, and what it does."""

import json
import textwrap


def settings(args) -> int:
    """``settings``: every setting, in sections, with its value in the profile, what it accepts, and its help."""
    from src_assets.config import setting_reference
    from src_assets.profiles import profile

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
    print("\n--set NAME=VALUE sets one; --set sft.FIELD=VALUE (base, sft, judge, dpo, lora) sets a trainer field.")
    return 0
