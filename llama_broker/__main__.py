"""``python -m llama_broker``: the command line (see :mod:`llama_broker.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
