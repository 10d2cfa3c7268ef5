"""``python -m pegaflow_core`` is the ``pegaflow`` command."""

import sys

from .cli import main

sys.exit(main())
