"""niximage operator: reconciles NixImage resources into builder pods and status.

Imports point one way: ``__main__``/``command`` → ``running`` → ``handlers`` (the only kopf
decorators) → ``reconciling`` (I/O orchestration) → ``kube`` (the only API client code) and
the pure modules ``decisions``, ``conditions``, ``podspec``, ``observations``, ``specs``,
``settings``. The pure modules do no I/O and can be tested without a cluster.

Rule: imports niximage_core only (the image spec and its key, build results, storage and
its layout, to find cached results and record tags), never the builder, the registry or
the command line: it never runs Nix.
"""
