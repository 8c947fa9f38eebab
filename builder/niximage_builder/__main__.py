"""``python -m niximage_builder`` is the ``niximage`` command (builder pods run this)."""

import sys

from niximage_builder.cli import main

sys.exit(main())
