"""``python -m niximage_cli`` is the ``niximage`` command (builder pods run it as ``niximage``)."""

import sys

from niximage_cli import main

sys.exit(main())
