"""A saved policy's model card (the README.md of its model directory): what it was trained from, how, on what,
and how each iteration of its lineage scored."""

from __future__ import annotations

import json

METRIC_COLUMNS = ("accuracy", "factuality", "completeness", "consistency", "judge_win_rate_vs_previous")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def model_card(
    name: str,
    base_model: str,
    iteration: int,
    started_from: str,
    training: dict,
    data: dict,
    metrics: list[dict],
    settings: dict,
) -> str:
    """The card's Markdown. ``metrics``: one dict per evaluated iteration of the lineage (``iteration``,
    ``checkpoint`` and the metrics); ``training``: what the training reported (steps, loss, pairs...);
    ``data``: the source files and row counts; ``settings``: every setting of the run."""
    stage = "rationale SFT (iteration 0)" if iteration == 0 else f"SRC iteration {iteration} (weighted DPO)"
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base_model}",
        "tags: [self-rationale-calibration, src, dpo, vision-language]",
        "---",
        "",
        f"# {name}",
        "",
        f"A vision-language policy after {stage}, written by the SRC (Self-Rationale Calibration) pipeline. It "
        "writes a rationale, then `Answer: ...`.",
        "",
        "## Lineage",
        "",
        f"- base model: `{base_model}`",
        f"- trained from: `{started_from}`",
        *(f"- iteration {m['iteration']}: `{m['checkpoint']}`" for m in metrics),
        "",
        "## Training",
        "",
        *(f"- {k}: {_cell(v)}" for k, v in training.items()),
        "",
        "## Data",
        "",
        *(f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in data.items()),
        "",
        "## Held-out metrics per iteration",
        "",
    ]
    if metrics:
        lines += [
            "| iteration | " + " | ".join(METRIC_COLUMNS) + " |",
            "|---" * (len(METRIC_COLUMNS) + 1) + "|",
            *(f"| {m['iteration']} | " + " | ".join(_cell(m.get(c)) for c in METRIC_COLUMNS) + " |" for m in metrics),
        ]
    else:
        lines.append("Not evaluated yet.")
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=1, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)
