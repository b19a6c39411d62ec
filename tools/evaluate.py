"""Run ``localopt-eval`` from a checkout: ``python tools/evaluate.py --help``."""

import sys

from localopt_plugin.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
