"""The tokenizer stage: `python -m stages.tokenizer`."""

import sys

from nanoforge.tokenizer.training import main

if __name__ == "__main__":
    sys.exit(main())
