"""`python -m unidml ...` (what torchrun and the deepspeed launcher run)."""
import sys

from unidml.launcher.cli import main

sys.exit(main())
