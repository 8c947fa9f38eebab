"""``python -m niximage_registry``: ``niximage serve`` without on-demand builds (a registry-only
process needs no builder)."""

import sys

from niximage_registry.command import main

sys.exit(main())
