"""niximage builder: from Nix package names to OCI images in storage.

Pure core (naming, closure graphs, layering, tar, manifests, results) plus thin
adapters (Nix, storage, HTTP). Entry point: ``niximage`` (see ``cli``).
"""

__version__ = "0.1.0"
