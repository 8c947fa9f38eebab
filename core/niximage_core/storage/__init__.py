"""Storage backends behind one interface (``base.Storage``); layout in
docs/architecture.md#storage-layout."""
