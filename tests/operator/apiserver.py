"""A Kubernetes API server for operator tests: kmock's emulator, held to the real contract.

kmock 0.8's ``KubernetesEmulator`` serves discovery and keeps objects, but kopf and our
operator rely on parts of the API it does not emulate (kmock's own docs say what it leaves out).
This
subclass keeps kmock's discovery and HTTP plumbing and serves objects itself. Each rule
follows the API server's documented behaviour, named in the comments ("API concepts" is
https://kubernetes.io/docs/reference/using-api/api-concepts/):

- every write gets a new, increasing ``metadata.resourceVersion`` (one counter, as etcd's
  revision); a write that changes nothing is not a write (no new version, no event);
- ``metadata.generation`` starts at 1 and grows when anything but metadata and status
  changes (CRD docs, "Status subresource");
- with the status subresource, the main endpoint ignores ``.status`` and ``/status``
  ignores everything else; a custom resource is created without status (same page);
- ``metadata.resourceVersion`` in a patch or replace body is a precondition (409 Conflict);
  a failed JSON-patch ``test`` is 422; creating an existing name is 409 AlreadyExists;
- ``generateName`` (API concepts, "Generated values"); the namespace comes from the URL;
- deletion with finalizers sets ``deletionTimestamp``; removing the last finalizer deletes;
  no new finalizer once deletion started ("Finalizers");
- list returns ``<Kind>List`` with the collection's resourceVersion; watch from a
  resourceVersion replays what happened after it, 410 Gone when that is too old, and
  ends after ``timeoutSeconds`` (API concepts, "Efficient detection of changes");
- ``labelSelector`` / ``fieldSelector`` on list and watch; an object leaving or entering
  the selection is DELETED / ADDED for that watcher ("Labels and Selectors");
- custom resources are defaulted and validated against the CRD's openAPIV3Schema on every
  write (422 Invalid) — but not pruned, so tests can see fields a real server would drop;
- the garbage collector deletes an object once all its owners are gone and drops dangling
  owner references while some owner remains ("Garbage Collection", background policy).

Not emulated (no test relies on them): strategic-merge and apply patches (415), pod
graceful deletion (pods go at once, as with gracePeriodSeconds=0), chunked lists
(``limit``/``continue``), bookmarks other than the end of initial events, CEL
transition rules (``oldSelf``). CEL rules on ``self`` are evaluated with cel-python.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import random
import re
import string
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
from kmock._internal import apps, rendering

HISTORY_LIMIT = 20000
"""Events kept per resource for watches that resume from a resourceVersion."""

Json = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = False
    schema: Json | None = None
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return self.group, self.plural

    @property
    def custom(self) -> bool:
        return self.schema is not None

    @classmethod
    def from_crd(cls, crd: Mapping[str, Any]) -> Kind:
        spec = crd["spec"]
        version = next(v for v in spec["versions"] if v.get("storage"))
        names = spec["names"]
        return cls(
            group=spec["group"],
            version=version["name"],
            plural=names["plural"],
            kind=names["kind"],
            namespaced=spec["scope"] == "Namespaced",
            status_subresource="status" in (version.get("subresources") or {}),
            schema=version["schema"]["openAPIV3Schema"],
            short_names=tuple(names.get("shortNames") or ()),
            categories=tuple(names.get("categories") or ()),
        )


BUILTIN_KINDS = (
    Kind("", "v1", "namespaces", "Namespace", namespaced=False, status_subresource=True),
    Kind("", "v1", "pods", "Pod", namespaced=True, status_subresource=True),
    Kind("", "v1", "events", "Event", namespaced=True),
    Kind(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        status_subresource=True,
    ),
)


@dataclass(frozen=True)
class Target:
    """A request's object address."""

    kind: Kind
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclass
class Watcher:
    kind: Kind
    namespace: str | None
    matches: Callable[[Json], bool]
    queue: asyncio.Queue[Json] = field(default_factory=asyncio.Queue)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    kinds: dict[tuple[str, str], Kind] = attrs.field(factory=dict, init=False)
    store: dict[tuple[str, str, str | None, str], Json] = attrs.field(factory=dict, init=False)
    history: dict[tuple[str, str], collections.deque[tuple[int, Json]]] = attrs.field(
        factory=dict, init=False
    )
    compacted: dict[tuple[str, str], int] = attrs.field(factory=dict, init=False)
    watchers: list[Watcher] = attrs.field(factory=list, init=False)
    revision: int = attrs.field(default=0, init=False)
    creations: list[tuple[str, str | None, str]] = attrs.field(factory=list, init=False)
    """(plural, namespace, name) of every successful create, in order."""
    gc_delay: float = 0.05
    """The garbage collector works in the background, a moment after the owner is gone."""
    keep_versions: bool = True
    """Keep every written version of custom resources (for schema checks in tests)."""
    versions: dict[str, list[Json]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for kind in BUILTIN_KINDS:
            self.declare(kind)

    # ---- set-up -------------------------------------------------------------------------

    def declare(self, kind: Kind) -> None:
        """Serve a resource, and advertise it in discovery (through kmock)."""
        self.kinds[kind.key] = kind
        self.resources[f"{kind.api_version}/{kind.plural}"] = kmock.ResourceInfo(
            kind=kind.kind,
            namespaced=kind.namespaced,
            singular=kind.kind.lower(),
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
            shortnames=set(kind.short_names),
            categories=set(kind.categories),
            subresources={"status"} if kind.status_subresource else set(),
        )

    def install_crd(self, crd: Mapping[str, Any]) -> Kind:
        """What ``kubectl apply -f crd.yaml`` does: the CRD object, and the new resource."""
        crds = self.kinds[("apiextensions.k8s.io", "customresourcedefinitions")]
        self._create(crds, None, copy.deepcopy(dict(crd)))
        return Kind.from_crd(crd)

    def create_namespace(self, name: str) -> None:
        self._create(self.kinds[("", "namespaces")], None, {"metadata": {"name": name}})

    # ---- reading, for tests -------------------------------------------------------------

    def objects(self, plural: str, namespace: str | None = None) -> list[Json]:
        return [
            copy.deepcopy(obj)
            for (_, p, ns, _), obj in sorted(self.store.items(), key=lambda kv: str(kv[0]))
            if p == plural and (namespace is None or ns == namespace)
        ]

    def status_writes_to_main_endpoint(self, plural: str) -> list[str]:
        """Writes to ``<plural>/<name>`` (not ``/status``) that try to change the status: a
        real server ignores them when the status subresource is on, so they are bugs.
        Requests of the tests themselves (kmock's own client) are not counted."""
        found = []
        for request in self._requests:
            if request.headers.get("User-Agent", "").startswith("kmock/"):
                continue
            path = request.url.path
            if request.method not in ("PATCH", "PUT") or f"/{plural}/" not in path:
                continue
            if path.endswith("/status"):
                continue
            data = request.data
            touches = (isinstance(data, dict) and "status" in data) or (
                isinstance(data, list)
                and any(str(op.get("path", "")).startswith("/status") for op in data)
            )
            if touches:
                method = getattr(request.method, "value", request.method)
                found.append(f"{method} {path}: {data}")
        return found

    def accesses(self, user_agents: tuple[str, ...]) -> set[tuple[str, str, str]]:
        """(verb, API group, resource[/subresource]) of every request whose User-Agent
        starts with one of ``user_agents``, in RBAC's terms (for permission checks)."""
        found = set()
        for request in self._requests:
            if request.headers.get("User-Agent", "").startswith(user_agents):
                access = self.access_of(request)
                if access is not None:
                    found.add(access[:3])
        return found

    def access_of(self, request: Any) -> tuple[str, str, str, str | None] | None:
        """(verb, API group, resource[/subresource], namespace) of a request, as RBAC sees
        it; None for discovery (allowed to every authenticated user) and unknown paths."""
        try:
            target = self._target(request.url.path)
        except ApiError:
            return None
        if target is None:
            return None
        method = getattr(request.method, "value", request.method)
        watching = request.params.get("watch") in ("true", "1")
        verb = {
            "GET": "watch" if watching else ("get" if target.name else "list"),
            "POST": "create",
            "PATCH": "patch",
            "PUT": "update",
            "DELETE": "delete",
        }[method]
        resource = target.kind.plural + (f"/{target.subresource}" if target.subresource else "")
        return verb, target.kind.group, resource, target.namespace

    def written(self, plural: str) -> list[Json]:
        """Every version of custom resources of ``plural`` ever stored."""
        return [copy.deepcopy(obj) for obj in self.versions.get(plural, ())]

    def find(self, plural: str, namespace: str | None, name: str) -> Json | None:
        for (_, p, ns, n), obj in self.store.items():
            if (p, ns, n) == (plural, namespace, name):
                return copy.deepcopy(obj)
        return None

    # ---- discovery fix --------------------------------------------------------------------

    async def _serve_version(self, request: Any) -> Any:
        # kmock reports groupVersion "/v1" for the core group; the API says "v1".
        payload = await super()._serve_version(request)
        if isinstance(payload, dict):
            payload["groupVersion"] = payload["groupVersion"].lstrip("/")
            # A subresource has no short names or categories of its own (kmock copies the
            # resource's, and kubectl then matches "nimg" and "nix" to niximages/status too).
            for entry in payload.get("resources", ()):
                if "/" in entry.get("name", ""):
                    entry.update(shortNames=[], categories=[], verbs=["get", "patch", "update"])
        return payload

    # ---- dispatch -------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 cannot parse the path of the namespace collection itself
        # (``/api/v1/namespaces``: its parser expects a namespace name after "namespaces").
        # Such requests are ours anyway: parse just what _handle needs, and record them.
        if raw_request.path.rstrip("/") != "/api/v1/namespaces":
            return await super().__call__(raw_request)
        body = await raw_request.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        request = rendering.Request(
            id=len(self._requests),
            raw_request=raw_request,
            url=raw_request.url,
            method=raw_request.method,
            params=dict(raw_request.query),
            headers=dict(raw_request.headers),
            data=data,
            body=body,
            text=body.decode(errors="replace"),
        )
        self._requests.append(request)
        return await self._handle(request)

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        try:
            target = self._target(request.url.path)
        except ApiError as error:
            return self._error(error)
        if target is None:  # discovery: kmock's
            return await apps.RawHandler._handle(self, request)
        try:
            return await self._serve(request, target)
        except ApiError as error:
            return self._error(error)

    def _target(self, path: str) -> Target | None:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if not rest:
            return None
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = rest[0], (rest[1:2] or [None])[0], "/".join(rest[2:]) or None
        kind = self.kinds.get((group, plural))
        if kind is None or kind.version != version:
            raise ApiError(404, "NotFound", f"the server could not find the resource {path}")
        if kind.namespaced and name is not None and namespace is None:
            raise ApiError(404, "NotFound", f"{kind.plural} must be addressed in a namespace")
        return Target(kind, namespace, name, sub)

    async def _serve(self, request: Any, target: Target) -> aiohttp.web.StreamResponse:
        method = request.method.value if hasattr(request.method, "value") else request.method
        params = request.params
        if method == "GET" and params.get("watch") in ("true", "1"):
            return await self._watch(request, target)
        if target.subresource not in (None, "status"):
            raise ApiError(404, "NotFound", f"subresource {target.subresource} is not served")
        if method == "GET" and target.name is None:
            return self._json(self._list(target, params))
        if method == "GET":
            return self._json(self._existing(target))
        if method == "POST" and target.name is None:
            body = self._body(request)
            return self._json(self._create(target.kind, target.namespace, body), 201)
        if method == "PATCH" and target.name is not None:
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            return self._json(self._patch(target, content_type, self._body(request, list)))
        if method == "PUT" and target.name is not None:
            return self._json(self._replace(target, self._body(request)))
        if method == "DELETE" and target.name is not None:
            return self._json(self._delete(target.kind, target.namespace, target.name))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")

    # ---- operations -----------------------------------------------------------------------

    def _create(self, kind: Kind, namespace: str | None, body: Json) -> Json:
        obj = copy.deepcopy(body)
        metadata = obj.setdefault("metadata", {})
        if kind.namespaced:
            if namespace is None:
                raise ApiError(400, "BadRequest", "a namespaced object needs a namespace URL")
            if metadata.get("namespace") not in (None, namespace):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace "
                    "sent on the request",
                )
            metadata["namespace"] = namespace
            if ("", "namespaces", None, namespace) not in self.store:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
        else:
            metadata.pop("namespace", None)
        if not metadata.get("name"):
            prefix = metadata.get("generateName")
            if not prefix:
                raise ApiError(422, "Invalid", "name or generateName is required")
            metadata["name"] = prefix + "".join(random.choices(string.ascii_lowercase, k=5))
        address = (kind.group, kind.plural, metadata.get("namespace"), metadata["name"])
        if address in self.store:
            raise ApiError(
                409, "AlreadyExists", f'{kind.plural} "{metadata["name"]}" already exists'
            )
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        for system in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            metadata.pop(system, None)
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = now_text()
        metadata["generation"] = 1
        if kind.status_subresource:
            # Custom resources: "create cannot set status"; pods start Pending, namespaces
            # Active (the registries' PrepareForCreate).
            obj.pop("status", None)
            if kind.plural == "pods":
                obj["status"] = {"phase": "Pending"}
            elif kind.plural == "namespaces":
                obj["status"] = {"phase": "Active"}
        self._admit(kind, obj)
        self._write(kind, address, None, obj, "ADDED")
        self.creations.append((kind.plural, metadata.get("namespace"), metadata["name"]))
        if kind.plural == "customresourcedefinitions":
            self.declare(Kind.from_crd(obj))  # a created CRD is served (and discovered)
        return copy.deepcopy(obj)

    def _patch(self, target: Target, content_type: str, patch: Any) -> Json:
        old = self._existing(target)
        if content_type == "application/merge-patch+json":
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            self._precondition(old, patch)
            proposed = merge_patch(old, patch)
        elif content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiError(400, "BadRequest", "a JSON patch must be a list")
            try:
                proposed = jsonpatch.apply_patch(old, patch, in_place=False)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise ApiError(422, "Invalid", f"the server rejected our request: {exc}") from exc
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise ApiError(422, "Invalid", f"invalid JSON patch: {exc}") from exc
        else:
            raise ApiError(415, "UnsupportedMediaType", f"{content_type} is not emulated")
        return self._update(target, old, proposed)

    def _replace(self, target: Target, body: Json) -> Json:
        old = self._existing(target)
        self._precondition(old, body)
        return self._update(target, old, copy.deepcopy(body))

    def _precondition(self, old: Json, body: Mapping[str, Any]) -> None:
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                "Operation cannot be fulfilled: the object has been modified; please apply "
                "your changes to the latest version and try again",
            )

    def _update(self, target: Target, old: Json, proposed: Json) -> Json:
        kind = target.kind
        new = copy.deepcopy(proposed)
        if kind.status_subresource:
            if target.subresource == "status":
                # /status changes the status only.
                new = {**copy.deepcopy(old), "status": new.get("status")}
                if new["status"] is None:
                    del new["status"]
            elif "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        metadata = new.setdefault("metadata", {})
        before = old["metadata"]
        for immutable in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ):
            if immutable in before:
                metadata[immutable] = before[immutable]
            else:
                metadata.pop(immutable, None)
        new["apiVersion"], new["kind"] = kind.api_version, kind.kind
        if before.get("deletionTimestamp"):
            added = set(metadata.get("finalizers") or ()) - set(before.get("finalizers") or ())
            if added:
                raise ApiError(
                    422,
                    "Invalid",
                    "Forbidden: no new finalizers can be added if the object is being deleted",
                )
        if _without(new, "metadata", "status") != _without(old, "metadata", "status"):
            metadata["generation"] = before.get("generation", 1) + 1
        if new == old:
            return copy.deepcopy(old)  # no change, no write
        self._admit(kind, new)
        address = (kind.group, kind.plural, target.namespace, target.name)
        if before.get("deletionTimestamp") and not metadata.get("finalizers"):
            self._remove(kind, address, new)
            return copy.deepcopy(new)
        self._write(kind, address, old, new, "MODIFIED")
        return copy.deepcopy(new)

    def _delete(self, kind: Kind, namespace: str | None, name: str) -> Json:
        address = (kind.group, kind.plural, namespace, name)
        old = self.store.get(address)
        if old is None:
            raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return copy.deepcopy(old)
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_text()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            self._write(kind, address, old, new, "MODIFIED")
            return copy.deepcopy(new)
        self._remove(kind, address, old)
        return copy.deepcopy(old)

    def _list(self, target: Target, params: Mapping[str, str]) -> Json:
        matches = self._selection(target, params)
        items = [
            copy.deepcopy(obj)
            for (group, plural, _, _), obj in self.store.items()
            if (group, plural) == target.kind.key and matches(obj)
        ]
        return {
            "apiVersion": target.kind.api_version,
            "kind": f"{target.kind.kind}List",
            "metadata": {"resourceVersion": str(self.revision)},
            "items": items,
        }

    async def _watch(self, request: Any, target: Target) -> aiohttp.web.StreamResponse:
        params = request.params
        kind = target.kind
        watcher = Watcher(kind, target.namespace, self._selection(target, params))
        since = params.get("resourceVersion") or "0"
        # Everything before the first await happens atomically: no event is lost between
        # the replay and the live stream.
        if since == "0":
            initial = [
                {"type": "ADDED", "object": obj}
                for (group, plural, _, _), obj in self.store.items()
                if (group, plural) == kind.key and watcher.matches(obj)
            ]
            if params.get("sendInitialEvents") == "true":
                initial.append(self._initial_events_end(kind))
        else:
            revision = int(since)
            if revision < self.compacted.get(kind.key, 0):
                initial = [_gone(revision)]
            else:
                initial = [
                    event
                    for rv, event in self.history.get(kind.key, ())
                    if rv > revision and watcher.matches(event["object"])
                ]
        self.watchers.append(watcher)
        timeout = float(params.get("timeoutSeconds") or 1800)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await response.prepare(request._raw_request)
            for event in initial:
                await response.write(json.dumps(event).encode() + b"\n")
            if initial and initial[-1]["type"] == "ERROR":
                return response
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (remaining := deadline - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except ConnectionResetError:  # the client went away
            pass
        finally:
            self.watchers.remove(watcher)
        return response

    # ---- helpers ----------------------------------------------------------------------------

    def _existing(self, target: Target) -> Json:
        assert target.name is not None
        obj = self.store.get((*target.kind.key, target.namespace, target.name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{target.kind.plural} "{target.name}" not found')
        return copy.deepcopy(obj)

    def _admit(self, kind: Kind, obj: Json) -> None:
        """Defaulting and validation of custom resources against the CRD schema."""
        if kind.schema is None:
            return
        apply_defaults(obj, kind.schema)
        errors = sorted(
            jsonschema.Draft4Validator(kind.schema).iter_errors(obj), key=lambda e: list(e.path)
        )
        causes = [
            f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}" for e in errors
        ] + list_type_problems(obj, kind.schema)
        if not causes:  # as the API server: CEL rules run on a schema-valid object
            causes = cel_problems(obj, kind.schema)
        if causes:
            causes_text = "; ".join(causes)
            name = obj.get("metadata", {}).get("name")
            message = f'{kind.kind}.{kind.group} "{name}" is invalid: {causes_text}'
            raise ApiError(422, "Invalid", message)

    def _write(
        self,
        kind: Kind,
        address: tuple[str, str, str | None, str],
        old: Json | None,
        new: Json,
        event_type: str,
    ) -> None:
        self.revision += 1
        new["metadata"]["resourceVersion"] = str(self.revision)
        self.store[address] = new
        if self.keep_versions and kind.custom:
            self.versions.setdefault(kind.plural, []).append(new)
        self._emit(kind, event_type, old, new)

    def _remove(self, kind: Kind, address: tuple[str, str, str | None, str], last: Json) -> None:
        self.revision += 1
        gone = copy.deepcopy(last)
        gone["metadata"]["resourceVersion"] = str(self.revision)
        del self.store[address]
        self._emit(kind, "DELETED", gone, gone)
        uid = gone["metadata"].get("uid")
        if uid:
            asyncio.get_running_loop().call_later(self.gc_delay, self._collect, uid, address[2])

    def _collect(self, owner_uid: str, namespace: str | None) -> None:
        """The garbage collector, for the dependents of one deleted owner."""
        for address, obj in list(self.store.items()):
            references = obj["metadata"].get("ownerReferences") or []
            if address[2] != namespace and namespace is not None:
                continue
            if not any(ref.get("uid") == owner_uid for ref in references):
                continue
            kind = self.kinds[address[:2]]
            remaining = [
                ref
                for ref in references
                if ref.get("uid") != owner_uid and self._uid_exists(ref.get("uid"))
            ]
            if remaining:
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = remaining
                self._write(kind, address, obj, new, "MODIFIED")
            else:
                with contextlib.suppress(ApiError):
                    self._delete(kind, address[2], address[3])

    def _uid_exists(self, uid: str | None) -> bool:
        return any(obj["metadata"].get("uid") == uid for obj in self.store.values())

    def _emit(self, kind: Kind, event_type: str, old: Json | None, new: Json) -> None:
        event = {"type": event_type, "object": new}
        revision = int(new["metadata"]["resourceVersion"])
        log = self.history.setdefault(kind.key, collections.deque())
        log.append((revision, event))
        while len(log) > HISTORY_LIMIT:
            dropped, _ = log.popleft()
            self.compacted[kind.key] = dropped
        for watcher in self.watchers:
            if watcher.kind.key != kind.key:
                continue
            now_in = watcher.matches(new) and event_type != "DELETED"
            was_in = old is not None and watcher.matches(old)
            if event_type == "DELETED":
                if was_in:
                    watcher.queue.put_nowait(event)
            elif now_in and was_in:
                watcher.queue.put_nowait(event)
            elif now_in:
                watcher.queue.put_nowait({"type": "ADDED", "object": new})
            elif was_in:
                watcher.queue.put_nowait({"type": "DELETED", "object": new})

    def _selection(self, target: Target, params: Mapping[str, str]) -> Callable[[Json], bool]:
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""))
        namespace = target.namespace

        def matches(obj: Json) -> bool:
            metadata = obj.get("metadata") or {}
            if namespace is not None and metadata.get("namespace") != namespace:
                return False
            return labels(metadata.get("labels") or {}) and fields(metadata)

        return matches

    def _initial_events_end(self, kind: Kind) -> Json:
        return {
            "type": "BOOKMARK",
            "object": {
                "apiVersion": kind.api_version,
                "kind": kind.kind,
                "metadata": {
                    "resourceVersion": str(self.revision),
                    "annotations": {"k8s.io/initial-events-end": "true"},
                },
            },
        }

    @staticmethod
    def _body(request: Any, allowed: type = dict) -> Any:
        data = request.data
        if not isinstance(data, dict | allowed):
            raise ApiError(400, "BadRequest", "the request body is not JSON")
        return data

    @staticmethod
    def _json(obj: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(obj, status=status)

    @staticmethod
    def _error(error: ApiError) -> aiohttp.web.Response:
        return aiohttp.web.json_response(
            {
                "apiVersion": "v1",
                "kind": "Status",
                "metadata": {},
                "status": "Failure",
                "message": error.message,
                "reason": error.reason,
                "code": error.code,
            },
            status=error.code,
        )


def _gone(revision: int) -> Json:
    return {
        "type": "ERROR",
        "object": {
            "apiVersion": "v1",
            "kind": "Status",
            "status": "Failure",
            "reason": "Expired",
            "message": f"too old resource version: {revision}",
            "code": 410,
        },
    }


def _without(obj: Mapping[str, Any], *keys: str) -> Json:
    return {k: v for k, v in obj.items() if k not in keys}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_defaults(obj: Any, schema: Mapping[str, Any]) -> None:
    """Structural-schema defaulting: a missing property with a ``default`` gets it."""
    if not isinstance(obj, dict):
        if isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
            for item in obj:
                apply_defaults(item, schema["items"])
        return
    for name, sub in (schema.get("properties") or {}).items():
        if name not in obj and "default" in sub:
            obj[name] = copy.deepcopy(sub["default"])
        if name in obj:
            apply_defaults(obj[name], sub)


def list_type_problems(obj: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """``x-kubernetes-list-type``: a ``set`` holds no duplicates, a ``map`` no two items
    with the same keys (the API server checks these besides the JSON schema)."""
    problems: list[str] = []
    if isinstance(obj, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in obj:
                problems += list_type_problems(obj[name], sub, f"{path}.{name}".lstrip("."))
    elif isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set":
            seen = [json.dumps(item, sort_keys=True) for item in obj]
            duplicates = sorted({item for item in seen if seen.count(item) > 1})
            problems += [f"{path}: Duplicate value: {item}" for item in duplicates]
        elif list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            items = [item for item in obj if isinstance(item, dict)]
            seen = [json.dumps([item.get(k) for k in keys]) for item in items]
            duplicates = sorted({item for item in seen if seen.count(item) > 1})
            problems += [f"{path}: Duplicate value: {item}" for item in duplicates]
        for index, item in enumerate(obj):
            problems += list_type_problems(item, schema["items"], f"{path}[{index}]")
    return problems


def cel_problems(obj: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """``x-kubernetes-validations``: each rule, with ``self`` the value at its level, must
    be true; a false one is reported with its message ("Validation rules", CRD docs)."""
    import celpy  # only the CRD's rules need it

    problems: list[str] = []
    for rule in schema.get("x-kubernetes-validations") or ():
        environment = celpy.Environment()
        program = environment.program(environment.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(obj)}):
            message = rule.get("message") or f"failed rule: {rule['rule']}"
            problems.append(f"{path or '<root>'}: Invalid value: {message}")
    if isinstance(obj, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in obj:
                problems += cel_problems(obj[name], sub, f"{path}.{name}".lstrip("."))
    elif isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(obj):
            problems += cel_problems(item, schema["items"], f"{path}[{index}]")
    return problems


_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_.\-/]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.\-]*)|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)


def _split_requirements(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def parse_label_selector(text: str) -> Callable[[Mapping[str, str]], bool]:
    """The label selector grammar: =, ==, !=, in, notin, key, !key, joined by commas."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for requirement in _split_requirements(text):
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {requirement!r}")
        key, op, value = match["key"], match["op"], match["value"]
        if match["neg"]:
            checks.append(lambda labels, key=key: key not in labels)
        elif op in ("=", "=="):
            checks.append(lambda labels, key=key, value=value: labels.get(key) == value)
        elif op == "!=":
            checks.append(lambda labels, key=key, value=value: labels.get(key) != value)
        elif match["setop"]:
            values = {v.strip() for v in match["values"].split(",") if v.strip()}
            inside = match["setop"] == "in"
            checks.append(
                lambda labels, key=key, values=values, inside=inside: (
                    (labels.get(key) in values) if inside else (labels.get(key) not in values)
                )
            )
        else:
            checks.append(lambda labels, key=key: key in labels)
    return lambda labels: all(check(labels) for check in checks)


def parse_field_selector(text: str) -> Callable[[Mapping[str, Any]], bool]:
    """Field selectors every resource supports: metadata.name and metadata.namespace."""
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for requirement in (r for r in text.split(",") if r.strip()):
        match = re.match(
            r"^\s*(metadata\.name|metadata\.namespace)\s*(==|=|!=)\s*(.*?)\s*$", requirement
        )
        if match is None:
            raise ApiError(400, "BadRequest", f"field label not supported: {requirement!r}")
        name, op, value = match[1].split(".")[1], match[2], match[3]
        checks.append(
            lambda metadata, name=name, op=op, value=value: (
                (metadata.get(name) == value) == (op != "!=")
            )
        )
    return lambda metadata: all(check(metadata) for check in checks)


def strict_schema(schema: Any) -> Any:
    """The schema with unknown properties forbidden: what a real API server would prune
    is an error here, so tests notice a status field the CRD does not declare."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    result = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
        and result.get("type") == "object"
    ):
        result["additionalProperties"] = False
    return result


def schema_problems(objects: Iterable[Json], schema: Mapping[str, Any]) -> list[str]:
    """Every way the objects break the schema (strictly: no undeclared fields)."""
    validator = jsonschema.Draft4Validator(strict_schema(schema))
    problems = []
    for obj in objects:
        name = obj.get("metadata", {}).get("name")
        for error in validator.iter_errors(obj):
            path = ".".join(str(p) for p in error.path) or "<root>"
            problems.append(f"{name}: {path}: {error.message}")
    return problems
