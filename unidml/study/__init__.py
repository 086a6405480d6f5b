"""The loss-comparison study: per-loss tuning on the validation split, seeded retraining, the report.

Imports only downward (engine, models, losses, data_pipeline, evaluation, kernels, config); the
launcher's `compare` command is its one caller. See docs/design.md for the layout.
"""
