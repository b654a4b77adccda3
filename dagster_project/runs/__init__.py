"""``src-calibrate``, the command line:

cli.py              the parser and ``main``: each command's options and help
run.py              ``run``: the loop as runs of the code location's jobs, and the table of iterations
launch.py           how those runs start: executed here, or queued for a daemon
recovery.py         dead runs released, a SIGTERM honoured, completed iterations reused
step_log.py         one line per finished step while a run goes
evaluate.py         ``evaluate``: a checkpoint on fresh scenes or on your rows
export.py           ``export``: a preference set in TRL's columns
settings.py         ``settings``: every setting with its value, range and help
store_check.py      ``store check``: current versions against manifests, leftovers of cut writes
experiments.py      ``experiment``: the ablation table over seeds
bench_generation.py ``bench-generation``: tokens/s and memory of candidate search and judging
"""
