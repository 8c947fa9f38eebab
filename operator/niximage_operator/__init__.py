"""niximage operator: reconciles NixImage resources into builder pods and status.

Imports point one way: ``__main__``/``command`` → ``running`` → ``handlers`` (the only kopf
decorators) → ``reconciling`` (I/O orchestration) → ``kube`` (the only API client code) and
the pure modules ``decisions``, ``conditions``, ``podspec``, ``observations``, ``specs``,
``settings``. The pure modules do no I/O and can be tested without a cluster. From the
builder the operator uses the image spec and its key, build results, and storage (to
find cached results and to record tags); it never runs Nix.
"""
