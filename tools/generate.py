"""Run ``localopt-generate`` from a checkout: ``python tools/generate.py --help``."""

import sys

from localopt_plugin.generation.cli import main

if __name__ == "__main__":
    sys.exit(main())
