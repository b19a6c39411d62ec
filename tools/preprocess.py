"""Run ``localopt-preprocess`` from a checkout: ``python tools/preprocess.py --help``."""

import sys

from localopt_plugin.preprocess.cli import main

if __name__ == "__main__":
    sys.exit(main())
