"""niximage core: what the builder, the registry and the operator share.

Rule: imports nothing of the three components (import-linter's contracts in
pyproject.toml keep it so). Two kinds of module:

- pure (no I/O): ``errors``, ``digest``, ``reference``, ``names``, ``sources``,
  ``imagespec``, ``manifest``, ``result``, ``resource``, ``units``, ``checkpoints``; they
  never import the adapters below;
- the storage adapter, shared because every component reads or writes the same objects:
  ``storage`` (the interface and its filesystem and GCS backends), ``layout`` (where build
  results and tags live) and ``gc`` (the collector and the protocol builds follow).

docs/architecture.md has the layout, the identity and caching rules and the gc protocol.
"""

__version__ = "0.1.0"
