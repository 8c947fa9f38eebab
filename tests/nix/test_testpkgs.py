"""The offline package set nix/testpkgs: it builds, its closures are real, its programs run in
a root file system made of nothing but their closure."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.nix

REPO = Path(__file__).resolve().parents[2]
TESTPKGS = REPO / "nix" / "testpkgs"
NIX_CONFIG = "\n".join(
    [
        "sandbox = false",
        "build-users-group =",
        "experimental-features = nix-command",
        "substituters =",
        "max-jobs = 2",
    ]
)
BIG_SIZE_MB = 64
# Dotted attribute paths built besides the top-level derivations.
EXTRA_ATTRS = ["python3.pkgs.pyhello"]
DIAMOND = ["diamond-top", "diamond-left", "diamond-right", "diamond-bottom"]

if shutil.which("nix-build") is None:
    pytest.skip("nix-build is not installed", allow_module_level=True)

CHROOT = shutil.which("chroot")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or CHROOT is None, reason="needs root and chroot(8)"
)


def nix(*args: str) -> str:
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def nix_eval(expr: str) -> object:
    return json.loads(nix("nix-instantiate", "--eval", "--json", "--strict", "-E", expr))


# The set's summary in one evaluation: derivation attributes with their output paths, and the
# attributes that are null.
SUMMARY = f"""
let
  s = import {TESTPKGS} {{ bigSizeMB = {BIG_SIZE_MB}; }};
  names = builtins.attrNames s;
  isDrv = n: (s.${{n}}.type or null) == "derivation";
in {{
  drvs = builtins.listToAttrs (map (n: {{ name = n; value = s.${{n}}.outPath; }})
    (builtins.filter isDrv names));
  nulls = builtins.filter (n: s.${{n}} == null) names;
  extra = {{ "python3.pkgs.pyhello" = s.python3.pkgs.pyhello.outPath; }};
}}
"""


@pytest.fixture(scope="module")
def summary() -> dict:
    return nix_eval(SUMMARY)


@pytest.fixture(scope="module")
def pkgs(summary: dict) -> dict[str, Path]:
    """Build the whole set once; attribute path -> output path."""
    attrs = {**summary["drvs"], **summary["extra"]}
    argv = ["nix-build", str(TESTPKGS), "--no-out-link", "--arg", "bigSizeMB", str(BIG_SIZE_MB)]
    for attr in attrs:
        argv += ["-A", attr]
    built = set(nix(*argv).split())
    assert built == set(attrs.values())
    return {attr: Path(path) for attr, path in attrs.items()}


def closure(path: Path) -> set[str]:
    return set(nix("nix-store", "-qR", str(path)).split())


def references(path: Path) -> set[str]:
    return set(nix("nix-store", "-q", "--references", str(path)).split()) - {str(path)}


def run_in_closure_root(tmp_path: Path, pkg: Path, *argv: str, stdin: str = "") -> str:
    """Run argv in a chroot holding only the runtime closure of pkg."""
    root = tmp_path / "root"
    (root / "nix" / "store").mkdir(parents=True)
    (root / "tmp").mkdir()
    for path in closure(pkg):
        if Path(path).is_dir():
            shutil.copytree(path, root / path.lstrip("/"), symlinks=True)
        else:
            shutil.copy2(path, root / path.lstrip("/"), follow_symlinks=False)
    proc = subprocess.run(
        [str(CHROOT), str(root), *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env={"PATH": f"{pkg}/bin", "HOME": "/tmp", "LC_ALL": "C"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_attribute_count(summary: dict) -> None:
    assert len(summary["drvs"]) >= 20


def test_null_attribute(summary: dict) -> None:
    assert summary["nulls"] == ["nullpkg"]


def test_names_for_nixery_mapping(pkgs: dict[str, Path]) -> None:
    assert {"_1hello", "Xhello", "hello"} <= pkgs.keys()
    assert "xhello" not in pkgs
    assert (pkgs["_1hello"] / "bin" / "1hello").exists()
    shell = {"bashInteractive", "coreutils", "moreutils", "nano"}
    assert shell <= pkgs.keys()


def test_python3_is_a_derivation_with_pkgs(pkgs: dict[str, Path]) -> None:
    assert nix_eval(f"(import {TESTPKGS} {{}}).python3.type") == "derivation"
    pyhello = pkgs["python3.pkgs.pyhello"]
    assert str(pkgs["python3"]) in references(pyhello)
    out = subprocess.run(
        [pyhello / "bin" / "pyhello", "tests"], capture_output=True, text=True, check=True
    )
    assert out.stdout == "Hello, tests!\n"


def test_real_references(pkgs: dict[str, Path]) -> None:
    glibc = str(pkgs["glibc"])
    assert references(pkgs["jq"]) == {glibc, str(pkgs["libjq"])}
    assert references(pkgs["libjq"]) == {glibc, str(pkgs["oniguruma"])}
    python_refs = references(pkgs["python3"])
    for lib in ["libssl", "sqlite", "libffi", "zlib", "expat", "readline", "glibc"]:
        assert str(pkgs[lib]) in python_refs, lib
    assert str(pkgs["busybox"]) in references(pkgs["hello"])
    with_refs = [attr for attr, path in pkgs.items() if references(path)]
    assert len(with_refs) >= 20


def test_elf_files_use_only_the_store(pkgs: dict[str, Path]) -> None:
    """Every program has the store's loader as ELF interpreter, every dynamically linked ELF
    file a RUNPATH of store directories only."""
    patchelf = str(pkgs["patchelf"] / "bin" / "patchelf")
    loader = f"{pkgs['glibc']}/lib/ld-linux-x86-64.so.2"
    checked = 0
    for attr in ["jq", "libjq", "python3", "coreutils", "bash", "nano", "openssl", "moreutils"]:
        for file in sorted(pkgs[attr].rglob("*")):
            if file.is_symlink() or not file.is_file():
                continue
            with file.open("rb") as f:
                if f.read(4) != b"\x7fELF":
                    continue
            if file.parent.name == "bin":
                assert nix(patchelf, "--print-interpreter", str(file)).strip() == loader, file
            if nix(patchelf, "--print-needed", str(file)).split():
                rpath = nix(patchelf, "--print-rpath", str(file)).strip().split(":")
                assert all(d.startswith("/nix/store/") for d in rpath), file
            checked += 1
    assert checked > 100


def test_busybox_applets(pkgs: dict[str, Path]) -> None:
    bin_dir = pkgs["busybox"] / "bin"
    for applet in ["sh", "ls", "cat", "env", "echo"]:
        assert (bin_dir / applet).is_symlink()
    out = subprocess.run(
        [bin_dir / "sh", "-c", "echo ok | cat"], capture_output=True, text=True, check=True
    )
    assert out.stdout == "ok\n"
    assert references(pkgs["busybox"]) == set()


def test_diamond_closure(pkgs: dict[str, Path]) -> None:
    expected = {str(pkgs[attr]) for attr in [*DIAMOND, "busybox"]}
    assert closure(pkgs["diamond-top"]) == expected
    assert references(pkgs["diamond-left"]) == {str(pkgs["diamond-bottom"]), str(pkgs["busybox"])}
    out = subprocess.run(
        [pkgs["diamond-top"] / "bin" / "diamond-top"], capture_output=True, text=True, check=True
    )
    assert out.stdout == "top(left(bottom),right(bottom))\n"


def test_build_only_dependency(pkgs: dict[str, Path]) -> None:
    tool = str(pkgs["build-tool"])
    assert closure(pkgs["with-build-dep"]) == {str(pkgs["with-build-dep"]), str(pkgs["busybox"])}
    drv = nix("nix-store", "-q", "--deriver", str(pkgs["with-build-dep"])).strip()
    build_inputs = nix("nix-store", "-q", "--references", drv).split()
    tool_drv = nix("nix-store", "-q", "--deriver", tool).strip()
    assert tool_drv in build_inputs
    out = subprocess.run(
        [pkgs["with-build-dep"] / "bin" / "with-build-dep"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "16 256 4096" in out.stdout


def test_data_packages(pkgs: dict[str, Path]) -> None:
    bundle = pkgs["cacert"] / "etc" / "ssl" / "certs" / "ca-bundle.crt"
    assert bundle.read_text().count("BEGIN CERTIFICATE") > 100
    etc = pkgs["iana-etc"] / "etc"
    assert "tcp" in (etc / "protocols").read_text()
    assert "https" in (etc / "services").read_text()
    assert (pkgs["tzdata"] / "share" / "zoneinfo" / "Europe" / "Berlin").read_bytes()[:4] == b"TZif"


def test_big(pkgs: dict[str, Path]) -> None:
    files = sorted(p for p in pkgs["big"].rglob("*") if p.is_file())
    assert sum(p.stat().st_size for p in files) == BIG_SIZE_MB * 2**20
    assert references(pkgs["big"]) == set()
    sample = b"".join(p.read_bytes() for p in files[:24])
    ratio = len(gzip.compress(sample, compresslevel=1)) / len(sample)
    assert 0.15 < ratio < 0.8


def test_rebuild_builds_nothing(pkgs: dict[str, Path]) -> None:
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG}
    proc = subprocess.run(
        ["nix-build", str(TESTPKGS), "--dry-run", "--arg", "bigSizeMB", str(BIG_SIZE_MB)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "will be built" not in proc.stderr


def test_aarch64_evaluates() -> None:
    expr = f"""
      let s = import {TESTPKGS} {{ system = "aarch64-linux"; }};
      in map (p: p.system) [ s.jq s.python3 s.python3.pkgs.pyhello s.busybox s.diamond-top ]
    """
    assert nix_eval(expr) == ["aarch64-linux"] * 5


@needs_root
def test_jq_runs_in_closure_chroot(pkgs: dict[str, Path], tmp_path: Path) -> None:
    jq = pkgs["jq"]
    assert run_in_closure_root(tmp_path, jq, f"{jq}/bin/jq", "--version").startswith("jq-")
    out = run_in_closure_root(tmp_path / "2", jq, f"{jq}/bin/jq", "-c", ".a", stdin='{"a":[1]}')
    assert out == "[1]\n"


@needs_root
def test_python3_runs_in_closure_chroot(pkgs: dict[str, Path], tmp_path: Path) -> None:
    python3 = pkgs["python3"]
    script = (
        "import ssl, sqlite3, json, hashlib, ctypes, lzma, bz2, zlib, readline, uuid;"
        "print(sqlite3.connect(':memory:').execute('select 6*7').fetchone()[0],"
        " hashlib.sha256(b'').hexdigest()[:8], ssl.OPENSSL_VERSION.split()[0])"
    )
    out = run_in_closure_root(tmp_path, python3, f"{python3}/bin/python3", "-c", script)
    assert out == "42 e3b0c442 OpenSSL\n"


@needs_root
@pytest.mark.parametrize(
    ("attr", "argv", "expected"),
    [
        ("bash", ["bin/bash", "-c", "echo $((6*7))"], "42\n"),
        ("bashInteractive", ["bin/bash", "--version"], "GNU bash"),
        ("coreutils", ["bin/env", "--version"], "env (GNU coreutils)"),
        ("moreutils", ["bin/isutf8", "--help"], "isutf8"),
        ("nano", ["bin/nano", "--version"], "GNU nano"),
        ("openssl", ["bin/openssl", "version"], "OpenSSL 3"),
        ("python3.pkgs.pyhello", ["bin/pyhello"], "Hello, world!\n"),
    ],
)
def test_program_runs_in_closure_chroot(
    pkgs: dict[str, Path], tmp_path: Path, attr: str, argv: list[str], expected: str
) -> None:
    pkg = pkgs[attr]
    out = run_in_closure_root(tmp_path, pkg, f"{pkg}/{argv[0]}", *argv[1:])
    assert expected in out
