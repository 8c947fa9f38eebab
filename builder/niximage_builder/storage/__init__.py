"""Storage backends behind one interface (``base.Storage``); layout of DESIGN.md §3."""
