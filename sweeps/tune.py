"""An Optuna study whose trials are FCE runs: `python sweeps/tune.py --help` (fce/tune.py)."""

import sys

from fce.tune import main

if __name__ == "__main__":
    main(sys.argv[1:])
