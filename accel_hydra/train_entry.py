"""``python -m accel_hydra.train_entry``: the console script, for ``accelerate launch -m``."""

import sys

from accel_hydra.cli import main

if __name__ == "__main__":
    sys.exit(main())
