"""The tags this project reads or writes on runs and materializations, in one place."""

# On the runs that `src-calibrate run` launches: what recovery and reuse look runs up by.
RUN_HOST_TAG = "src/host"  # the machine whose command started the run (a dead run's process is looked for there)
RUN_PID_TAG = "src/pid"  # that command's process
SETTINGS_TAG = "src/settings"  # the digest of the run's settings: a completed iteration is reused only under the same
STORE_LEASE_OWNER_TAG = "src/store_lease_owner"  # a command that holds the store's lease runs its runs under it
# Runs carry the store's URI; materializations a short label of it (resources.store_label), as tag values must be
# short, with the whole URI in their metadata.
STORE_TAG = "src/store"
# Runs of the iteration jobs: deploy/dagster.yaml's run queue lets one such run go at a time, so iterations run in
# order.
ITERATION_RUN_TAGS = {"src/iteration_run": "true"}

# Dagster's own tags, which it does not export: the partition a run materializes, and the versions it records on
# each materialization.
PARTITION_TAG = "dagster/partition"
CODE_VERSION_TAG = "dagster/code_version"
DATA_VERSION_TAG = "dagster/data_version"
INPUT_DATA_VERSION_TAG = "dagster/input_data_version/"  # + the upstream asset's key
