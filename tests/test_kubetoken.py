"""TokenFileAuth: the token file is read again when it changes, at most once per recheck."""

from __future__ import annotations

import os
from pathlib import Path

import requests

from niximage_core import kubetoken


def header(auth: kubetoken.TokenFileAuth) -> str:
    request = requests.Request("GET", "https://api.example/").prepare()
    return str(auth(request).headers["Authorization"])


def test_the_file_is_followed_as_it_is_replaced(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    auth = kubetoken.TokenFileAuth(str(token), recheck=0)
    assert header(auth) == "Bearer first"
    # The kubelet replaces the file through a symlink swap: a new inode.
    replacement = tmp_path / "token.new"
    replacement.write_text("second")
    os.replace(replacement, token)
    assert header(auth) == "Bearer second"
    token.unlink()  # between the kubelet's steps: the last token stays
    assert header(auth) == "Bearer second"


def test_the_file_is_looked_at_once_per_recheck(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first")
    auth = kubetoken.TokenFileAuth(str(token), recheck=3600)
    assert header(auth) == "Bearer first"
    token.write_text("second")
    assert header(auth) == "Bearer first"


def test_which_file() -> None:
    assert kubetoken.token_file({"tokenFile": "/run/token"}, False) == "/run/token"
    assert kubetoken.token_file({"token": "inline"}, False) is None
