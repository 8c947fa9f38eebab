"""The Nix adapter: failure classification (pure) and real Nix runs on tiny package sets."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from niximage_builder import nixcli
from niximage_core import imagespec, sources
from niximage_core.errors import NixFailure, NixMissing, NixTimeout, PackagesNotFound

needs_nix = pytest.mark.skipif(shutil.which("nix-build") is None, reason="Nix is not installed")


def test_not_found_marker_lists_every_name() -> None:
    stderr = 'error: niximage-not-found:["nope","python3.nope"]\n(use --show-trace)'
    error = nixcli.classify_failure(stderr)
    assert isinstance(error, PackagesNotFound)
    assert error.names == ["nope", "python3.nope"]


def test_build_failure_is_classified() -> None:
    stderr = (
        "building '/nix/store/x.drv'...\n"
        "error: builder for '/nix/store/x.drv' failed with exit code 1"
    )
    error = nixcli.classify_failure(stderr)
    assert isinstance(error, NixFailure) and error.kind == "BuildFailed"
    assert "exit code 1" in str(error)


def test_eval_error_is_classified() -> None:
    error = nixcli.classify_failure("error: undefined variable 'foo'\n at x.nix:1:1")
    assert isinstance(error, NixFailure) and error.kind == "EvalError"
    assert "undefined variable 'foo'" in str(error)


@pytest.mark.parametrize(
    ("stderr", "transient"),
    [
        ("error: unable to download 'https://github.com/NixOS/nixpkgs/archive/x.tar.gz':"
         " Couldn't resolve host name (6)", True),
        ("error: unable to download 'http://mirror/x.tar.gz': Timeout was reached (28)", True),
        ("fatal: unable to access 'https://example.org/p.git/': Could not resolve host", True),
        ("error: unable to download 'https://github.com/NixOS/nixpkgs/archive/0000.tar.gz':"
         " HTTP error 404", False),
        ("error: undefined variable 'foo'", False),
    ],
)  # fmt: skip
def test_network_failures_are_worth_another_attempt(stderr: str, transient: bool) -> None:
    error = nixcli.classify_failure(stderr)
    assert isinstance(error, NixFailure) and error.kind == "EvalError"
    assert error.transient is transient


class _Answer404(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@needs_nix
@pytest.mark.parametrize("reachable", [False, True], ids=["unreachable", "http-404"])
def test_a_nixpkgs_download_that_fails_says_whether_to_retry(reachable: bool) -> None:
    """Real Nix fetching a nixpkgs tarball from a mirror: a server that does not answer is
    worth another attempt; a 404 (no such commit) is not."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer404)
    port = server.server_address[1]
    if reachable:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        server.server_close()  # nothing listens on the port any more
    settings = nixcli.NixSettings(
        timeout=60,
        nixpkgs_archive=f"http://127.0.0.1:{port}/archive",
        extra_args=("--option", "download-attempts", "1", "--option", "connect-timeout", "5"),
    )
    spec = imagespec.make_spec(["jq"], sources.parse_source("nixpkgs:" + "ab" * 20))
    try:
        with pytest.raises(NixFailure) as caught:
            nixcli.realise(spec, settings)
    finally:
        if reachable:
            server.shutdown()
            server.server_close()
    assert caught.value.kind == "EvalError"
    assert f"127.0.0.1:{port}/archive/{'ab' * 20}.tar.gz" in str(caught.value)
    assert caught.value.transient is not reachable


def test_missing_nix_binary() -> None:
    with pytest.raises(NixMissing, match="not installed"):
        nixcli.run_nix(["/nonexistent/nix-build"], timeout=5)


SLOW_SET = """
{ system ? builtins.currentSystem }:
let
  tools = builtins.path { path = ./tools; name = "tools"; };
  sh = "${tools}/busybox";
in {
  cacert = derivation { name = "cacert"; inherit system; builder = sh;
    args = [ "sh" "-c" "${sh} mkdir $out" ]; };
  iana-etc = derivation { name = "iana-etc"; inherit system; builder = sh;
    args = [ "sh" "-c" "${sh} mkdir $out" ]; };
  slow = derivation { name = "slow-MARKER"; inherit system; builder = sh;
    args = [ "sh" "-c" "${sh} sleep 300; ${sh} mkdir $out" ]; };
  broken = derivation { name = "broken"; inherit system; builder = sh;
    args = [ "sh" "-c" "exit 3" ]; };
  evalerror = throw "this package is marked broken";
}
"""


@pytest.fixture
def slow_set(tmp_path: Path) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox-static is not installed")
    (tmp_path / "tools").mkdir()
    shutil.copy(busybox, tmp_path / "tools" / "busybox")
    # A unique sleep length lets the test find (or not) the builder's process afterwards.
    seconds = str(1000 + os.getpid() % 100000)
    (tmp_path / "default.nix").write_text(
        SLOW_SET.replace("MARKER", seconds).replace("300", seconds)
    )
    return tmp_path


def _spec(directory: Path, *packages: str) -> imagespec.ImageSpec:
    return imagespec.make_spec(list(packages), sources.parse_source(f"path:{directory}"))


def _running(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


@needs_nix
@pytest.mark.nix
def test_timeout_kills_the_whole_process_group(slow_set: Path) -> None:
    # Without killing the group, Nix's builder (busybox sleep) would outlive nix-build.
    seconds = (slow_set / "default.nix").read_text().split("slow-")[1].split('"')[0]
    started = time.monotonic()
    with pytest.raises(NixTimeout, match="timed out after 3 s"):
        nixcli.realise(_spec(slow_set, "slow"), nixcli.NixSettings(timeout=3))
    assert time.monotonic() - started < 15
    time.sleep(0.5)
    assert _running(f"sleep {seconds}") == []


@needs_nix
@pytest.mark.nix
def test_cancel_event_stops_nix(slow_set: Path) -> None:
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    with pytest.raises(NixTimeout, match="cancelled"):
        nixcli.realise(_spec(slow_set, "slow"), nixcli.NixSettings(timeout=60), cancel)


@needs_nix
@pytest.mark.nix
def test_build_failure_and_eval_error(slow_set: Path) -> None:
    settings = nixcli.NixSettings(timeout=60)
    with pytest.raises(NixFailure) as build:
        nixcli.realise(_spec(slow_set, "broken"), settings)
    assert build.value.kind == "BuildFailed"
    with pytest.raises(NixFailure) as evaluation:
        nixcli.realise(_spec(slow_set, "evalerror"), settings)
    assert evaluation.value.kind == "EvalError"
    assert "marked broken" in str(evaluation.value)


@needs_nix
@pytest.mark.nix
def test_pinning_a_path_source_tracks_its_contents(slow_set: Path) -> None:
    settings = nixcli.NixSettings(timeout=60)
    source = sources.parse_source(f"path:{slow_set}")
    first = nixcli.pin_source(source, settings)
    assert first.pinned and nixcli.pin_source(source, settings) == first
    (slow_set / "extra.nix").write_text("{}")
    assert nixcli.pin_source(source, settings) != first


@needs_nix
@pytest.mark.nix
def test_git_source_pinned_to_a_revision(slow_set: Path, tmp_path: Path) -> None:
    """A package set in a git repository, fetched by Nix (fetchGit) at one revision."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    shutil.copytree(slow_set, repo)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "set"], check=True)
    rev = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    source = sources.parse_source(f"git:file://{repo}#{rev}")
    assert source.pinned
    spec = imagespec.make_spec(["cacert"], source)
    realised = nixcli.realise(spec, nixcli.NixSettings(timeout=120))
    names = sorted(root.split("/")[-1].split("-", 1)[1] for root in realised.roots)
    assert names == ["cacert", "iana-etc"]


def test_another_systems_build_is_allowed_only_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A builder on amd64 may build the arm64 platform of an index (qemu-user, or a cache);
    its own system needs no option."""
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "n", "6", "#1", "x86_64")))
    assert nixcli.platform_args("x86_64-linux") == ()
    assert nixcli.platform_args("aarch64-linux") == ("--option", "extra-platforms", "aarch64-linux")
