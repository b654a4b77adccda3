"""Dagster wiring of the SRC pipeline; the method itself lives in ``src_assets``."""
