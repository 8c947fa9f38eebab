"""``python -m niximage_core.gc``: the same as ``niximage gc``."""

import sys

from niximage_core.gc.command import main

sys.exit(main())
