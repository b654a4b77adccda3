"""How a setting is declared and checked, in one place.

A settings dataclass declares each field with ``setting(default, ...)``: its allowed range or names, its flat name
where that differs from the field's (``judge_template`` for ``JudgeConfig.template``), and a line of help. Its
``__post_init__`` calls ``validate_fields(self)``, so a settings object that exists is valid, however it was
made (a profile, ``--set``, the Launchpad, a notebook). Errors are one line naming the setting::

    setting tau: 1.5 is out of range; it must be in [0, 1]
"""

from __future__ import annotations

import difflib
import math
from dataclasses import MISSING, field, fields


def setting(default=MISSING, *, low=None, above=None, high=None, choices=None, check=None, name=None, help=""):
    """A dataclass field of a settings type. ``low``/``above``: the lowest allowed value (inclusive/exclusive);
    ``high``: the highest; ``choices``: the allowed names; ``check(value)``: raises ValueError with the reason;
    ``name``: the flat ``--set`` name, where it is not the field's own."""
    meta = {"help": help}
    if low is not None or above is not None:
        meta["range"] = (low if above is None else above, above is None, high)
    elif high is not None:
        meta["range"] = (-math.inf, True, high)
    if choices is not None:
        meta["choices"] = tuple(choices)
    if check is not None:
        meta["check"] = check
    if name is not None:
        meta["name"] = name
    return field(default=default, metadata=meta)


def flat_name(f) -> str:
    return f.metadata.get("name", f.name)


def validate_fields(obj) -> None:
    """Checks every field of a settings dataclass against its declaration; ValueError naming the first bad one."""
    for f in fields(obj):
        value, name, meta = getattr(obj, f.name), flat_name(f), f.metadata
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison of a range check
            raise ValueError(f"setting {name}: {value!r} is not a finite number")
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(f"setting {name}: {value!r} is not one of {meta['choices']}")
        if "range" in meta and not isinstance(value, bool):
            low, inclusive, high = meta["range"]
            if (value < low if inclusive else value <= low) or (high is not None and value > high):
                if high is None:
                    bound = f"{'>=' if inclusive else '>'} {low}"
                elif low == -math.inf:
                    bound = f"<= {high}"
                else:
                    bound = f"in [{low}, {high}]"
                raise ValueError(f"setting {name}: {value!r} is out of range; it must be {bound}")
        if "check" in meta:
            try:
                meta["check"](value)
            except ValueError as e:
                raise ValueError(f"setting {name}: {e}") from None


def allowed_values(f) -> str:
    """What a declared field accepts, in words: its names, or its range ("" where it declares neither)."""
    meta = f.metadata
    if "choices" in meta:
        return " | ".join(map(str, meta["choices"]))
    if "range" not in meta:
        return ""
    low, inclusive, high = meta["range"]
    if low == -math.inf:
        return f"<= {high}"
    if high is None:
        return f"{'>=' if inclusive else '>'} {low}"
    return f"{'[' if inclusive else '('}{low}, {high}]"


def did_you_mean(name: str, known) -> str:
    """ "; did you mean 'a', 'b' or 'c'?" with the (at most three) known names closest to ``name``, or ""."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    if not close:
        return ""
    quoted = [repr(c) for c in close]
    return "; did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"
