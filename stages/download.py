"""The download stage: `python -m stages.download`."""

import sys

from nanoforge.data.download import main

if __name__ == "__main__":
    sys.exit(main())
