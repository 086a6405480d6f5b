"""One module per `unidml` command: `add_arguments(parser)` and `run(args) -> int`."""
