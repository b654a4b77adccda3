"""The named profiles, and settings given by name (``--set``, the Launchpad's overrides) read as their types.

A profile is a set of defaults: ``default`` is the embedded run the README's main command makes; ``smoke`` shrinks
every size so that tests and quick checks finish in seconds. ``profile(name, **overrides)`` composes one with
overrides by flat name; each settings type checks its own fields as it is made.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import replace

from .candidate_search import SearchConfig
from .config import SETTING_GROUPS, SRCConfig, setting_names
from .preference import CurationConfig
from .setting import did_you_mean
from .training import TRAINER_CONFIGS, trainer_arg

PROFILES: dict[str, SRCConfig] = {
    "default": SRCConfig(),
    "smoke": SRCConfig(
        n_sft=60,
        n_calibrate=16,
        n_eval=20,
        tiny_hidden_size=32,
        tiny_layers=1,
        sft_epochs=1.0,
        n_base=64,
        base_epochs=1.0,
        prompts_per_iteration=8,
        search=SearchConfig(k=3, beams=2, samples_per_beam=2, max_sentences=7),
        judge_prompts=8,
        judge_max_pairs=64,
        judge_contrast_pairs=48,
        judge_epochs=1.0,
        dpo_epochs=1.0,
        dpo_batch_size=4,
        # untrained smoke models never answer right; this profile checks plumbing
        curation=CurationConfig(
            tau=0.0, require_correct_chosen=False, require_consistent_chosen=False, require_factual_chosen=False
        ),
        min_blank_image_drop=-1.0,  # nor do they see: the blank-image check is reported, not required
        min_base_exact_listing=0.0,
        anatomy_samples=2,
    ),
}


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def coerce_setting(name: str, value, kind: str):
    """``value`` (a string from the command line, or a JSON value) as the setting's type; a clear error if it is not."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in (*_TRUE, *_FALSE):
            return str(value).strip().lower() in _TRUE
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
    elif kind == "float":
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is not None:
            if not math.isfinite(number):  # NaN passes every comparison of a range check
                raise ValueError(f"setting {name}: {str(value)[:80]!r} is not a finite number")
            return number
    elif kind == "str":
        return str(value)
    raise ValueError(f"setting {name}: {str(value)[:80]!r} is not a valid {kind}")


# Old names that are still read, for one release, as the names they became ("scorer.FIELD" is "judge.FIELD").
RENAMED_SETTINGS = {
    "scorer_model": "judge_model",
    "tiny_scorer_architecture": "tiny_judge_architecture",
    "scorer_prompts": "judge_prompts",
    "scorer_max_pairs": "judge_max_pairs",
    "scorer_contrast_pairs": "judge_contrast_pairs",
    "scorer_epochs": "judge_epochs",
    "scorer_learning_rate": "judge_learning_rate",
    "scorer_batch_size": "judge_train_batch_size",
    "scorer_args": "judge_args",
}


class RenamedSettingWarning(Warning):
    """A setting given by a name it had before; it is read as its current name."""


def current_names(overrides: dict) -> tuple[dict, list[str]]:
    """``overrides`` under the settings' current names, and one line for each old name among them."""
    out, notes = {}, []
    for name, value in overrides.items():
        stage, dot, rest = name.partition(".")
        new = RENAMED_SETTINGS.get(name) or (f"judge.{rest}" if dot and stage == "scorer" else None)
        if new is not None:
            notes.append(
                f"setting {name} is now called {new}; the old name is read as the new one until the next release"
            )
            name = new
        out[name] = value
    return out, notes


def profile(name: str, **overrides) -> SRCConfig:
    """The named profile with ``overrides`` (flat names, values as strings or JSON values). It only composes: each
    settings type checks its own fields as it is made, with one-line errors that name the setting."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}")
    known = setting_names()
    overrides, notes = current_names(overrides)
    for note in notes:
        warnings.warn(note, RenamedSettingWarning, stacklevel=2)
    overrides = _with_trainer_args(overrides)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(
            "; ".join(f"unknown setting {name!r}{did_you_mean(name, known)}" for name in unknown)
            + " (src-calibrate settings lists every setting)"
        )
    typed = {k: coerce_setting(k, v, known[k][2]) for k, v in overrides.items()}
    base = PROFILES[name]
    nested = {
        group: replace(getattr(base, group), **{known[k][1]: v for k, v in typed.items() if known[k][0] == group})
        for group in SETTING_GROUPS
    }
    return replace(base, **{k: v for k, v in typed.items() if known[k][0] is None}, **nested)


def _with_trainer_args(overrides: dict) -> dict:
    """``sft.warmup_ratio=0.1`` and the like folded into their stage's ``sft_args`` JSON (over any given whole)."""
    out, dotted = {}, {}
    for name, value in overrides.items():
        stage, sep, field_name = name.partition(".")
        if not sep:
            out[name] = value
            continue
        if stage not in TRAINER_CONFIGS:
            raise ValueError(f"unknown setting {name!r}; dotted settings are {sorted(TRAINER_CONFIGS)}.FIELD")
        dotted.setdefault(stage, {})[field_name] = trainer_arg(stage, field_name, value)
    for stage, args in dotted.items():
        given = out.get(f"{stage}_args") or "{}"
        try:
            whole = json.loads(given) if isinstance(given, str) else dict(given)
        except (ValueError, TypeError):
            raise ValueError(f"setting {stage}_args: {str(given)[:80]!r} is not a JSON object") from None
        out[f"{stage}_args"] = json.dumps({**whole, **args}, sort_keys=True)
    return out
