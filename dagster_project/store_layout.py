"""Where everything lives in the store: the one owner of store keys.

The IO manager, the model-training assets, the iteration lease, the sensor and
the CLI all take their keys from here, so the layout can be read (and changed)
in one place:

    assets/<asset>[/<iteration>].parquet|json   asset values (the IO manager)
    models/<asset>[/<iteration>]/versions/...    model directories, CURRENT, MANIFEST.json (Store.put_model)
    models/<asset>/by_inputs/<digest>.json       which version a training with these inputs produced
    leases/iteration/<iteration>.json            the run writing an iteration now
    leases/store_run.json                        the src-calibrate run using this store now
    runs/<run id>/<step>/<output>.parquet|json   a step's output inside a graph asset (a shard's table)
    source/*.parquet, judgements/*.parquet       your data (prefixes are settings)
"""


def asset_value(asset: str, partition: str | None = None) -> str:
    """The key of an asset's stored value, without its suffix (``.parquet`` for tables, ``.json`` otherwise)."""
    return f"assets/{asset}" + (f"/{partition}" if partition is not None else "")


def asset_table(asset: str, partition: str | None = None) -> str:
    return asset_value(asset, partition) + ".parquet"


BASE_POLICY_CHECKPOINT = "models/base_policy_checkpoint"
BASE_JUDGE_CHECKPOINT = "models/base_judge_checkpoint"
SFT_CHECKPOINT = "models/sft_checkpoint"
JUDGE_CHECKPOINT = "models/judge_checkpoint"


def policy_checkpoint(iteration: str) -> str:
    """Policy k's model key (its versions and CURRENT pointer)."""
    return f"models/policy_checkpoint/{iteration}"


def trained_from(model: str, inputs_digest: str) -> str:
    """The record of which version of ``model`` a training from these inputs produced."""
    return f"{model}/by_inputs/{inputs_digest}.json"


def iteration_lease(iteration: str) -> str:
    return f"leases/iteration/{iteration}.json"


# One ``src-calibrate run`` per store at a time: from its first write to its end, so no other run rewrites the
# foundation (source table, eval set, SFT, judge) that this run's iterations read.
STORE_RUN_LEASE = "leases/store_run.json"


def step_output(run_id: str, step_key: str, output: str) -> str:
    """A step's output that is no asset (a shard's table inside a graph asset), kept under the run that made it so
    that a re-execution from failure reads it; ``step_key`` brackets (``search_shard[prompts_0_8]``) are kept."""
    return f"runs/{run_id}/{step_key}/{output}"
