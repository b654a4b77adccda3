"""Self-Rationale Calibration, one module per stage, usable without Dagster."""
