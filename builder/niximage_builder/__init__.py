"""niximage builder: from Nix package names to OCI images in storage.

Nix → closure → layers → tarballs → config and manifest → storage. Pure parts
(``closure``, ``popularity``, ``layering``, ``tarball``, ``compression``, ``toplayer``,
``plan``) and thin adapters (``nixcli`` runs Nix; ``build`` is the pipeline; ``export``
writes an OCI layout; ``commands`` are its ``niximage`` subcommands).

Rule: imports niximage_core only, never the registry, the operator or the command line.
"""
