"""``python -m niximage_builder.registry``: ``niximage serve`` (for a registry-only image)."""

import sys

from niximage_builder.registry.command import main

sys.exit(main())
