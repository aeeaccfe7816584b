"""The train stage: `python -m stages.train`."""

import sys

from nanoforge.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
