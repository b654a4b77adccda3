"""``src-calibrate``: runs the SRC loop through Dagster into a persistent instance, or scores a checkpoint.

The runs land in ``$DAGSTER_HOME`` (default ``./.dagster_home``), so
``dg dev`` shows their history, metadata and checks afterwards.
"""

import argparse
import os
import re
import sys

from src_assets.profiles import PROFILES

from .bench_generation import bench_generation
from .evaluate import evaluate
from .experiments import VARIANTS, experiment
from .export import export
from .run import run
from .settings import settings
from .store_check import store_check


def _seed(text: str) -> int:
    """``--seed``, checked as argparse reads it: before any data is built."""
    if not re.fullmatch(r"\d+", text.strip()) or int(text) > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"seed {text!r} must be an integer in [0, 4294967295]")
    return int(text)


STORE_HELP = "base URI of the store ($SRC_STORE_URI, else ./.src_store)"


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one to show (not for flags or unset options)."""

    def _get_help_string(self, action):
        default = action.default
        shown = not (default is None or default is False or default == [] or default == argparse.SUPPRESS)
        return f"{action.help} (default: %(default)s)" if action.option_strings and shown else action.help


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=_HelpWithDefaults, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="src-calibrate",
        description="Runs the SRC loop through Dagster into a persistent instance, or scores a checkpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="materialize the whole graph: SFT, judge, then N iterations in order")
    p.add_argument("--iterations", type=int, default=2, help="SRC iterations after the SFT checkpoint")
    p.add_argument(
        "--profile", choices=sorted(PROFILES), default="default", help="named defaults; smoke: tiny sizes, seconds"
    )
    p.add_argument("--store", help=STORE_HELP)
    p.add_argument("--seed", type=_seed, default=0, help="the seed setting: data, tiny models and training")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override any setting, e.g. --set tau=0.2 --set scoring=independent (src-calibrate settings lists them)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list on stdout")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show Dagster's event stream and the libraries' own output"
    )
    p.add_argument(
        "--executor",
        choices=("in_process", "multiprocess"),
        default="in_process",
        help="multiprocess: each step (each shard of candidate search and judging) in a process of its own",
    )
    p.add_argument(
        "--submit",
        action="store_true",
        help="queue the runs for a running dagster-daemon (deploy/dagster.yaml's run limits apply) instead of running "
        "them here",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="recompute everything: no SFT, judge or completed iteration of an earlier run is reused",
    )
    p.set_defaults(fn=run)
    e = sub.add_parser("evaluate", help="score a checkpoint on a freshly generated held-out set")
    e.add_argument(
        "--task",
        choices=("vqa", "caption"),
        default="vqa",
        help="vqa: answer the domain's questions; caption: describe each scene (a base-stage checkpoint)",
    )
    e.add_argument(
        "--anatomy",
        action="store_true",
        help="where the errors come from: exact listing, conclusion from listing, answer from conclusion, per kind",
    )
    e.add_argument(
        "--samples", type=int, default=6, help="with --anatomy: K samples per prompt for 'any correct and consistent'"
    )
    e.add_argument("--temperature", type=float, default=1.0, help="with --anatomy: the samples' temperature")
    e.add_argument("--checkpoint", required=True, help="a model directory, a store URI, or a hub id")
    e.add_argument("--store", help="the store holding s3:// checkpoints (default: $SRC_STORE_URI)")
    e.add_argument("--seed", type=_seed, default=12345, help="seed of the held-out scenes")
    e.add_argument("--n", type=int, default=500, help="held-out scenes generated (without --data)")
    e.add_argument(
        "--images",
        choices=("real", "blank"),
        default="real",
        help="blank: every image replaced by a blank one of the same size (does the policy use its image?)",
    )
    e.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    e.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on a GPU that supports it), float32, bfloat16, float16"
    )
    e.add_argument(
        "--data", help="score on your rows instead: a Parquet/JSON/JSONL file, a datasets folder, or a folder of them"
    )
    e.add_argument("--split", default="eval", help="with --data: the rows of this split")
    e.add_argument("--against", help="with --data: a second checkpoint; the judge's win rate of --checkpoint over it")
    e.add_argument(
        "--judge", default="verifier", help="with --against: a judge model directory, store URI or 'verifier'"
    )
    e.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --data: source settings, e.g. --set source_columns=question:prompt --set split_fractions=eval:1",
    )
    e.add_argument("--json", action="store_true", help="print the scores as JSON")
    e.set_defaults(fn=evaluate)
    o = sub.add_parser("export", help="an iteration's preference set as a Hugging Face dataset in TRL's columns")
    o.add_argument("--store", help=STORE_HELP)
    o.add_argument("--iteration", type=int, required=True, help="the iteration whose preference set to export")
    o.add_argument("--out", required=True, help="a new folder (read it with datasets.load_from_disk)")
    o.add_argument(
        "--all-pairs", action="store_true", help="dropped pairs too (their weight says why they were not kept)"
    )
    o.set_defaults(fn=export)
    c = sub.add_parser("store", help="the store's health").add_subparsers(dest="store_command", required=True)
    k = c.add_parser(
        "check",
        help="each model's current version against its manifest, and the leftovers of writes that never finished",
    )
    k.add_argument("--store", help=STORE_HELP)
    k.add_argument(
        "--sweep",
        type=float,
        metavar="HOURS",
        help="delete the leftovers older than HOURS (none are ever read; the age spares a write under way)",
    )
    k.set_defaults(fn=store_check)
    t = sub.add_parser("settings", help="every setting with its value, what it accepts, and what it does")
    t.add_argument("--profile", choices=sorted(PROFILES), default="default", help="show this profile's values")
    t.add_argument("--json", action="store_true", help="as a JSON list")
    t.set_defaults(fn=settings)
    x = sub.add_parser("experiment", help="the ablation table: each variant for each seed, as JSON and Markdown")
    x.add_argument("--seeds", type=_seed, nargs="+", default=[1, 2, 3], help="one run of every variant per seed")
    x.add_argument(
        "--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS), help="the ablations to run"
    )
    x.add_argument("--iterations", type=int, default=2, help="SRC iterations per run")
    x.add_argument("--profile", choices=sorted(PROFILES), default="default", help="named defaults for every run")
    x.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="applied to every variant")
    x.add_argument("--out", default="experiments", help="folder for each run's store and the table (JSON and Markdown)")
    x.add_argument(
        "--parallel", type=int, default=1, help="seeds at a time (each run gets cores / parallel torch threads)"
    )
    x.set_defaults(fn=experiment)
    b = sub.add_parser("bench-generation", help="tokens/s and peak memory of candidate search and judging")
    b.add_argument("--prompts", type=int, default=64, help="prompts searched and judged")
    b.add_argument("--policy", help="a policy directory (default: the tiny LLaVA after a short SFT)")
    b.add_argument("--judge", help="a judge directory (with --policy)")
    b.add_argument("--sft-epochs", type=float, default=4.0, help="the default policy's SFT epochs (without --policy)")
    b.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    b.add_argument("--code", help="a checkout whose src_assets to time instead of this one (before/after comparisons)")
    b.add_argument("--out", help="also write the JSON rows here")
    b.set_defaults(fn=bench_generation)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from src_assets.models import ModelLoadError
    from src_assets.storage import StoreError

    try:
        return args.fn(args)
    except (StoreError, ModelLoadError) as e:  # a store or a checkpoint that cannot be used: one line, its cause
        print(f"src-calibrate: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into a reader that stopped (| head): no traceback, and none at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
