"""``python -m singd_rkfac``: the ``singd-rkfac`` command line."""

import sys

from .cli import main

sys.exit(main())
