"""A real Nix binary cache for the tests: ``nix copy --to file://DIR`` writes it,
``nix store sign`` signs it with a key from ``nix-store --generate-binary-cache-key``, and
a static HTTP server (the standard library's) serves it, counting what it sends. Builds run
in a Nix store that is empty: ``/nix`` is a fresh tmpfs in a private mount namespace
(``unshare``), so nothing the host store holds can leak into the build."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from testsupport import ROOT, env, require, require_root

NIX = ("nix", "--extra-experimental-features", "nix-command")


def require_empty_store() -> None:
    require_root()
    require("nix-build", "unshare")


class Key:
    def __init__(self, folder: Path, name: str = "niximage-test-1") -> None:
        self.secret = folder / "secret.key"
        public = folder / "public.key"
        subprocess.run(
            ["nix-store", "--generate-binary-cache-key", name, str(self.secret), str(public)],
            check=True,
        )
        self.public = public.read_text().strip()


def copy_to_cache(
    cache: Path, paths: Sequence[str], compression: str, key: Key | None, source: str = ""
) -> None:
    """The closures of ``paths`` into the cache (signed with ``key`` when given), from this
    machine's store or ``source`` (a store URL, e.g. ``local?root=DIR``)."""
    url = f"file://{cache}?compression={compression}"
    origin = ["--from", source] if source else []
    subprocess.run([*NIX, "copy", *origin, "--to", url, *paths], check=True, capture_output=True)
    if key is not None:
        subprocess.run(
            [*NIX, "store", "sign", "--key-file", str(key.secret), "--store", f"file://{cache}",
             "--recursive", *paths],
            check=True, capture_output=True,
        )  # fmt: skip


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()


class CacheServer:
    """``http://127.0.0.1:<port>`` over a cache folder; ``requests`` lists the paths asked."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        handler = functools.partial(_Handler, directory=str(folder))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.requests = []  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def requests(self) -> list[str]:
        return self._server.requests  # type: ignore[attr-defined, no-any-return]

    def nar_requests(self) -> list[str]:
        return [path for path in self.requests if path.startswith("/nar/")]

    def served_nar_bytes(self, since: int = 0) -> int:
        """Bytes of the NAR files sent, from the ``since``-th request on."""
        asked = [p for p in self.requests[since:] if p.startswith("/nar/")]
        return sum((self.folder / p.lstrip("/")).stat().st_size for p in asked)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[CacheServer]:
    server = CacheServer(folder)
    try:
        yield server
    finally:
        server.close()


def in_empty_store(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with an empty Nix store (a tmpfs over /nix, for this process only)."""
    script = 'mount -t tmpfs niximage-empty-store /nix && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
        capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600,
    )  # fmt: skip


def empty_store_niximage(*args: str) -> subprocess.CompletedProcess[str]:
    """``niximage ARGS`` with an empty Nix store."""
    return in_empty_store(sys.executable, "-m", "niximage_cli", *args)


def build_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    if proc.returncode != 0:
        raise AssertionError(f"niximage build failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def closure_paths(result: dict[str, Any]) -> dict[str, int]:
    """Store path → NAR size, for every store path of a build result's layers."""
    return {
        path: layer["narSize"] if len(layer["paths"]) == 1 else -1
        for layer in result["layers"]
        for path in layer["paths"]
        if path != "<top>"
    }


def nar_sizes(paths: Sequence[str]) -> dict[str, int]:
    out = subprocess.run([*NIX, "path-info", "--json", *paths], capture_output=True, check=True)
    return {entry["path"]: entry["narSize"] for entry in json.loads(out.stdout)}


def bumped_package_set(folder: Path, package: str) -> Path:
    """The offline set with one package changed (a new attribute: a new store path, and
    new paths for everything that refers to it, as a nixpkgs bump gives)."""
    testpkgs = ROOT / "nix" / "testpkgs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "default.nix").write_text(
        f"{{ ... }}@args: let base = import {testpkgs} args; in base // {{\n"
        f'  {package} = derivation (base.{package}.drvAttrs // {{ niximageBump = "1"; }});\n'
        "}\n"
    )
    return folder
