"""``python -m bench.scale_model``: see :mod:`bench.scale_model.cli`."""

import sys

from bench.scale_model.cli import main

sys.exit(main())
