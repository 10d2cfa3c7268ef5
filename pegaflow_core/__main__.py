"""``python -m pegaflow_core`` is the ``pegaflow`` command."""

import sys

from .launcher import die_with_parent

die_with_parent()  # a child of DaemonProcess or of a benchmark: not left behind when it dies

from .cli import main  # noqa: E402

sys.exit(main())
