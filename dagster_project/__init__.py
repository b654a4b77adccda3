"""Dagster wiring of the SRC pipeline; the method itself lives in ``src_assets``.

definitions.py   the code location: assembles the assets, checks, jobs, schedule, sensor and resources
assets/          the asset graph, one module per part of it (its ``__init__`` is the map)
automation.py    the jobs (foundation, iteration, new data), the sensor and the schedule
resources.py     the store, the IO manager, the leases and the run settings
executors.py     the executor SRC_EXECUTOR picks, and the leases it holds for a whole run
versions.py      what each asset reads (``@reads``), and the code versions and reuse digests derived from it
store_layout.py  every key in the store
tags.py          the tags put on or read from runs and materializations
train_worker.py  one training in several processes under ``accelerate launch`` (a Dagster Pipes subprocess)
runs/            ``src-calibrate``: the command line, and how it launches, watches and recovers runs
observe/         what a run shows: metadata tables, trackers, training logs, model cards
"""
