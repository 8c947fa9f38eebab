"""``python -m niximage_builder.gc``: the same as ``niximage gc``."""

import sys

from niximage_builder.gc.command import main

sys.exit(main())
