"""The training side of a run: the trainer and what it orchestrates (backends, evaluator, meter, guards,
checkpoints, run directory and record). docs/design.md, "Layout"."""
