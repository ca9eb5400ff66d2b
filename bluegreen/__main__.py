"""Entry point for `python -m bluegreen` and for the zipapp."""

import sys

from bluegreen.cli import main

if __name__ == "__main__":
    sys.exit(main())
