"""The register stage: `python -m stages.register`."""

import sys

from nanoforge.registry import main

if __name__ == "__main__":
    sys.exit(main())
