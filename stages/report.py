"""The report stage: `python -m stages.report`."""

import sys

from nanoforge.reporting.report import main

if __name__ == "__main__":
    sys.exit(main())
