"""What a run shows besides its assets:

metadata.py       tables, histograms and matrices as Dagster metadata
trackers.py       report_to trackers, and the pipeline's own per-iteration metrics
training_log.py   trainer progress into the Dagster run log
policy_cards.py   every stored policy's model card, written beside its version
"""
