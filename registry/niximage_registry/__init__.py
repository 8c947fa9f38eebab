"""The registry: the pull side of the OCI distribution spec, served by ``niximage serve``.

Rule: imports niximage_core only (the storage, its layout, names and manifests), never the
builder, the operator or the command line. The registry only *reads* storage; the one
exception is on-demand mode (``ondemand``), which records a tag after a build that the
command line's build function runs, exactly as ``niximage build --tag`` would.

Modules, from the pure bottom to the HTTP top:

- ``errors``   distribution error codes and the JSON envelope: the one place errors become HTTP
- ``paths``    request path → (route, repository, reference), validated by the spec's grammars
- ``ranges``   the ``Range`` header → one byte range, or 416
- ``content``  storage reads behind caches (tags, manifests, repositories), off the event loop
- ``blobs``    blob responses: sendfile for local files, a 307 to a signed URL, or a stream
- ``auth``     credentials, HMAC bearer tokens, the token endpoint's policy
- ``ondemand`` single-flight, bounded build queue for Nixery-style names
- ``metrics``  Prometheus metrics; ``accesslog`` JSON-lines access log
- ``routes``   the handlers; ``app`` wires them (``make_app``); ``command`` is ``niximage serve``
  (``python -m niximage_registry``: the registry alone)
"""
