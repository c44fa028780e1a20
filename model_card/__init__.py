"""The model card: a template filled from measured data only."""
