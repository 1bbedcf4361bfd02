"""`python -m sld_minimal …`: the same command line as `sld-minimal …` (`cli.py`)."""
import sys

from .app.cli import main

sys.exit(main())
