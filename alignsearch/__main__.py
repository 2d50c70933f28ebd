"""``python -m alignsearch``: the same as the ``alignsearch`` command."""

import sys

from .cli import main

sys.exit(main())
