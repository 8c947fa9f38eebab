"""Following a moving package source on the real API server (``spec.follow``).

A local git repository stands for a package set on a branch: its ``default.nix`` is the
offline set with jq at some version. The operator resolves the branch with ``git ls-remote``,
the kubelet stand-in runs the builder pod (Nix fetches the pinned commit with fetchGit), and
each commit moves the tag, adds to the history and says what changed; a commit that does not
evaluate leaves the tag where it was.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from kubesupport.cluster import Cluster, condition, eventually
from tests.cluster.test_operator import BUILD_TIMEOUT, image, nix_image, tag_of, wait_reason

TESTPKGS = Path(__file__).resolve().parents[2] / "nix" / "testpkgs"


class PackageRepo:
    """A git repository whose ``main`` branch is a package set."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "--quiet", "--initial-branch=main")

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    def commit(self, default_nix: str, message: str) -> str:
        (self.path / "default.nix").write_text(default_nix)
        self.git("add", "default.nix")
        self.git("commit", "--quiet", "-m", message)
        return self.git("rev-parse", "HEAD")

    def commit_jq(self, version: str) -> str:
        return self.commit(
            f"args: let base = import {TESTPKGS} args; in base // {{\n"
            f'  jq = (derivation (base.jq.drvAttrs // {{ name = "jq-{version}"; }}))\n'
            f'    // {{ pname = "jq"; version = "{version}"; }};\n'
            "}\n",
            f"jq {version}",
        )

    @property
    def url(self) -> str:
        return f"file://{self.path}"


def followed(name: str, repo: PackageRepo, ref: str = "main", **follow: Any) -> dict[str, Any]:
    source = {"type": "git", "url": repo.url, "ref": ref}
    return nix_image(name, ["jq"], packageSource=source, follow={"interval": "2s", **follow})


def events(kube: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    listed = kube.admin.run(
        "get", "events", "-n", namespace, "-o", "json",
        "--field-selector", f"involvedObject.kind=NixImage,involvedObject.name={name}",
    ).stdout  # fmt: skip
    return list(json.loads(listed)["items"])


def reasons(kube: Cluster, namespace: str, name: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for event in events(kube, namespace, name):
        found.setdefault(event["reason"], []).append(event["message"])
    return found


def test_a_followed_branch_rebuilds_moves_the_tag_and_says_what_changed(
    operator_running: Cluster, tenant: str, tmp_path: Path
) -> None:
    kube = operator_running
    repo = PackageRepo(tmp_path / "pkgs")
    first = repo.commit_jq("1.6")
    kube.admin.apply(followed("app", repo, historyLimit=5), namespace=tenant)
    ready = wait_reason(kube, tenant, "app", "Succeeded")
    status = ready["status"]
    assert status["follow"]["revision"] == first
    assert status["follow"]["source"] == f"git:{repo.url}#main"
    old_digest = status["digest"]
    assert tag_of(kube, f"{tenant}/app", "latest") == old_digest
    assert [(h["revision"], h["outcome"]) for h in status["history"]] == [(first, "Succeeded")]

    # The branch moves: a new revision, a new image, the tag follows.
    second = repo.commit_jq("1.7")

    def moved() -> dict[str, Any] | None:
        obj = image(kube, tenant, "app")
        new = obj.get("status", {})
        good = condition(obj).get("reason") == "Succeeded"
        return obj if good and new.get("digest") not in (None, old_digest) else None

    obj = eventually(moved, BUILD_TIMEOUT, "the image follows the branch")
    status = obj["status"]
    assert status["follow"]["revision"] == second
    assert tag_of(kube, f"{tenant}/app", "latest") == status["digest"]
    history = [(h["revision"], h["outcome"]) for h in status["history"]]
    assert history == [(second, "Succeeded"), (first, "Succeeded")]
    assert status["history"][0]["digest"] == status["digest"]
    change = status["lastChange"]
    assert change["from"] == old_digest and change["to"] == status["digest"]
    assert change["changed"] == [{"name": "jq", "oldVersion": "1.6", "newVersion": "1.7"}]
    assert "jq 1.6 → 1.7" in change["summary"] and change["layersReused"] >= 3

    def closure_event() -> dict[str, list[str]] | None:
        said = reasons(kube, tenant, "app")
        return said if "ClosureChanged" in said else None

    said = eventually(closure_event, 30, "a ClosureChanged event")
    assert any("jq 1.6 → 1.7" in m and second[:12] in m for m in said["ClosureChanged"])
    assert any(first[:12] in m and second[:12] in m for m in said["RevisionMoved"])
    good_digest = status["digest"]

    # A revision that does not evaluate: the tag stays, and the status says why.
    broken = repo.commit('args: let in throw "this revision is broken"\n', "broken")

    def refused() -> dict[str, Any] | None:
        obj = image(kube, tenant, "app")
        history = obj.get("status", {}).get("history") or [{}]
        return obj if history[0].get("revision") == broken else None

    obj = eventually(refused, BUILD_TIMEOUT, "the broken revision's failure is recorded")
    ready_condition = condition(obj)
    assert ready_condition["status"] == "False" and ready_condition["reason"] == "EvalError"
    assert f"revision {broken[:12]}" in ready_condition["message"]
    assert f"the tag still names {good_digest}" in ready_condition["message"]
    assert "this revision is broken" in ready_condition["message"]
    assert obj["status"]["history"][0]["outcome"] == "Failed"
    assert obj["status"]["digest"] == good_digest
    assert tag_of(kube, f"{tenant}/app", "latest") == good_digest
    assert len(obj["status"]["history"]) == 3


def test_follow_refuses_what_it_cannot_honour(
    operator_running: Cluster, tenant: str, tmp_path: Path
) -> None:
    kube = operator_running
    repo = PackageRepo(tmp_path / "pkgs")
    commit = repo.commit_jq("1.6")
    # Below the operator's minimum (1s here, 1m by default).
    kube.admin.apply(followed("fast", repo, interval="500ms"), namespace=tenant)
    obj = wait_reason(kube, tenant, "fast", "InvalidSpec")
    assert "below the operator's minimum of 1s" in condition(obj)["message"]
    # A reference that does not resolve.
    kube.admin.apply(followed("nowhere", repo, ref="no-such-branch"), namespace=tenant)
    obj = wait_reason(kube, tenant, "nowhere", "RevisionUnresolved")
    assert "has no ref 'no-such-branch'" in condition(obj)["message"]
    assert "no-such-branch" in obj["status"]["follow"]["message"]
    # A source that does not move.
    pinned = nix_image(
        "pinned", ["jq"], packageSource={"type": "git", "url": repo.url, "rev": commit},
        follow={"interval": "2s"},
    )  # fmt: skip
    kube.admin.apply(pinned, namespace=tenant)
    obj = wait_reason(kube, tenant, "pinned", "InvalidSpec")
    assert "does not move" in condition(obj)["message"]
    # Out of range: the API server refuses it with the schema's message.
    for bad, message in (
        ({"historyLimit": 0}, "spec.follow.historyLimit"),
        ({"historyLimit": 101}, "spec.follow.historyLimit"),
        ({"interval": "soon"}, "spec.follow.interval"),
    ):
        body = followed("bad", repo, **bad)
        proc = kube.admin.run(
            "create", "-n", tenant, "--validate=strict", "-f", "-",
            input=yaml.safe_dump(body), check=False,
        )  # fmt: skip
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not any(p for p in kube.admin.items("pods", tenant) if "fast" in str(p))


def test_a_source_the_policy_does_not_allow_gets_no_pod(
    operator_running: Cluster, tenant: str
) -> None:
    """The chart here allows git:file:///* (and its own default): a GitHub branch is refused."""
    kube = operator_running
    source = {"type": "git", "url": "https://github.com/NixOS/nixpkgs.git", "ref": "master"}
    kube.admin.apply(nix_image("elsewhere", ["jq"], packageSource=source), namespace=tenant)
    obj = wait_reason(kube, tenant, "elsewhere", "SourceNotAllowed")
    message = condition(obj)["message"]
    assert (
        "package source git:https://github.com/NixOS/nixpkgs.git#master is not allowed" in message
    )
    assert "the operator allows git:file:///*, path:" in message
    assert obj["status"]["phase"] == "Failed" and "buildKey" not in obj["status"]
    time.sleep(3)
    assert kube.admin.items("pods", tenant) == []
