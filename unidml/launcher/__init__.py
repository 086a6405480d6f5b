"""The `unidml` command line (`cli`) and its thin commands (`commands/`)."""
