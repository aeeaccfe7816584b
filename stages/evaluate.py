"""The evaluate stage: `python -m stages.evaluate`."""

import sys

from nanoforge.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
