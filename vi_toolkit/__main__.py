"""``python -m vi_toolkit``: the command line of :mod:`vi_toolkit.cli`."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the module (as the API reference does) runs nothing
    sys.exit(main())
