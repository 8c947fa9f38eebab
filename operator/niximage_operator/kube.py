"""The operator's own Kubernetes API calls: builder pods, and nudging a NixImage's status.

The only module that talks to the API server besides kopf (which watches and writes the
handlers' patches). Uses pykube-ng's HTTP client (credentials from the service account
in a pod, else ``$KUBECONFIG``), whose blocking calls run in a thread so the event loop
keeps serving kopf. Every write follows the API's own contract: creation answers 409 if
the pod exists, owner references are added with a JSON patch guarded by the pod's
resourceVersion, and NixImage status is written only to the ``/status`` subresource.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import pykube
import pykube.exceptions
import requests

from niximage_core import __version__, kubetoken
from niximage_operator import podspec
from niximage_operator.observations import format_time

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
CONFLICT_RETRIES = 5
USER_AGENT = f"niximage-operator/{__version__}"


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API: {message} (HTTP {status})" if status else message)
        self.status = status


class AlreadyExists(KubeError):
    pass


class Kube:
    """Builder pods and NixImage status, through one pykube-ng HTTP client."""

    def __init__(self, api: pykube.HTTPClient) -> None:
        self.api = api

    @classmethod
    def from_environment(cls, timeout: float = 30.0) -> Kube:
        """In a pod: its service account; elsewhere: ``$KUBECONFIG`` (read now, not at import)."""
        try:
            config = pykube.KubeConfig.from_env()
        except (pykube.exceptions.PyKubeError, OSError, ValueError) as exc:
            raise KubeError(0, f"no Kubernetes credentials (not in a pod, and {exc})") from exc
        api = pykube.HTTPClient(config, timeout=timeout)
        # Audit logs (and the tests' RBAC check) tell our requests from kopf's by this.
        api.session.headers["User-Agent"] = USER_AGENT
        path = kubetoken.token_file(config.user, from_service_account=config.filepath is None)
        if path is not None:  # a projected token is replaced before it expires: follow it
            api.session.auth = kubetoken.TokenFileAuth(path)
        return cls(api)

    def close(self) -> None:
        self.api.session.close()

    async def create_pod(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Create a pod; ``AlreadyExists`` when one has that name (someone was first)."""
        namespace = manifest["metadata"]["namespace"]
        return await self._call(
            "post", version="v1", namespace=namespace, url="pods", data=json.dumps(manifest)
        )

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("get", version="v1", namespace=namespace, url=f"pods/{name}")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def add_pod_owner(
        self, namespace: str, name: str, owner: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Make a NixImage one more owner of a shared builder pod (None: the pod is gone).

        A JSON patch with a ``test`` of the resourceVersion: two NixImages adopting the
        same pod at once must not overwrite each other's reference (a merge patch would
        replace the whole list).
        """
        uid = owner["metadata"]["uid"]
        for _ in range(CONFLICT_RETRIES):
            pod = await self.get_pod(namespace, name)
            if pod is None:
                return None
            references = pod["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in references):
                return pod
            reference = podspec.owner_reference(owner, controller=not references)
            operations: list[dict[str, Any]] = [
                {
                    "op": "test",
                    "path": "/metadata/resourceVersion",
                    "value": pod["metadata"]["resourceVersion"],
                },
                {"op": "add", "path": "/metadata/ownerReferences", "value": [reference]}
                if not references
                else {"op": "add", "path": "/metadata/ownerReferences/-", "value": reference},
            ]
            try:
                return await self._patch_pod(namespace, name, operations)
            except KubeError as exc:
                if exc.status not in (409, 422):  # 422: the test failed, the pod changed
                    raise
        raise KubeError(409, f"pod {namespace}/{name} kept changing while adding an owner")

    async def nudge_image(
        self,
        namespace: str,
        name: str,
        still_wants: Callable[[Mapping[str, Any]], bool],
        pod: str,
        phase: str,
    ) -> bool:
        """Record a builder pod and its phase in ``status.builderPod``/``builderPhase``.

        The reconcile handler watches those fields: this is how a build's progress reaches
        every NixImage waiting for it. ``still_wants(body)`` says whether the NixImage, as
        read now, still waits for this build; the write then carries that body's
        resourceVersion as a precondition, so news about an old spec never lands on a new
        one. The write goes to ``/status``. Returns whether it was written.
        """
        path = f"namespaces/{namespace}/{podspec.PLURAL}/{name}"
        for _ in range(CONFLICT_RETRIES):
            try:
                image = await self._call("get", version=podspec.API_VERSION, url=path)
            except KubeError as exc:
                if exc.status == 404:
                    return False
                raise
            metadata = image.get("metadata") or {}
            status = image.get("status") or {}
            if metadata.get("deletionTimestamp") or not still_wants(image):
                return False
            if (status.get("builderPod"), status.get("builderPhase")) == (pod, phase):
                return False
            patch = {
                "metadata": {"resourceVersion": metadata.get("resourceVersion")},
                "status": {"builderPod": pod, "builderPhase": phase},
            }
            try:
                await self._call(
                    "patch",
                    version=podspec.API_VERSION,
                    url=f"{path}/status",
                    data=json.dumps(patch),
                    headers={"Content-Type": MERGE_PATCH},
                )
                return True
            except KubeError as exc:
                if exc.status != 409:
                    raise
        return False

    async def patch_image_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        """Merge ``status`` into a NixImage's ``/status`` (gone already: nothing to do)."""
        path = f"namespaces/{namespace}/{podspec.PLURAL}/{name}/status"
        try:
            await self._call(
                "patch",
                version=podspec.API_VERSION,
                url=path,
                data=json.dumps({"status": status}),
                headers={"Content-Type": MERGE_PATCH},
            )
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def post_event(
        self, involved: Mapping[str, Any], warning: bool, reason: str, message: str
    ) -> None:
        """A core/v1 Event about ``involved`` (a NixImage), as kopf posts them: for news
        that comes from the operator's own loops rather than from a handler."""
        metadata = involved.get("metadata") or {}
        namespace = metadata.get("namespace")
        now = format_time(datetime.now(UTC))
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{metadata.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": podspec.API_VERSION,
                "kind": "NixImage",
                "name": metadata.get("name"),
                "namespace": namespace,
                "uid": metadata.get("uid"),
            },
            "type": "Warning" if warning else "Normal",
            "reason": reason,
            "message": message[:1024],
            "source": {"component": podspec.MANAGED_BY},
            "reportingComponent": podspec.MANAGED_BY,
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(
            "post", version="v1", namespace=namespace, url="events", data=json.dumps(event)
        )

    # plain objects (pull Secrets and their service account: niximage_operator.pullsecrets)

    async def get(self, version: str, url: str) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        try:
            return await self._call("get", version=version, url=url)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create_if_absent(self, version: str, url: str, manifest: Mapping[str, Any]) -> None:
        """Create an object in the collection ``url``; one that exists already is kept."""
        with contextlib.suppress(AlreadyExists):
            await self._call("post", version=version, url=url, data=json.dumps(manifest))

    async def put(
        self,
        version: str,
        url: str,
        name: str,
        manifest: Mapping[str, Any],
        stored: Mapping[str, Any] | None,
    ) -> None:
        """Create the object, or replace ``stored`` with it (guarded by its
        resourceVersion: a concurrent writer makes us read it again and retry)."""
        for _ in range(CONFLICT_RETRIES):
            if stored is None:
                try:
                    await self._call("post", version=version, url=url, data=json.dumps(manifest))
                    return
                except AlreadyExists:
                    stored = await self.get(version, f"{url}/{name}")
                    continue
            metadata = {
                **manifest["metadata"],
                "resourceVersion": stored["metadata"]["resourceVersion"],
            }
            try:
                await self._call(
                    "put",
                    version=version,
                    url=f"{url}/{name}",
                    data=json.dumps({**manifest, "metadata": metadata}),
                )
                return
            except KubeError as exc:
                if exc.status not in (404, 409):
                    raise
                stored = await self.get(version, f"{url}/{name}")
        raise KubeError(409, f"{url}/{name} kept changing while replacing it")

    async def request_token(
        self, namespace: str, service_account: str, seconds: int
    ) -> tuple[str, datetime]:
        """A bound token of a service account (the TokenRequest API), and its expiry."""
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        answer = await self._call(
            "post",
            version="v1",
            url=f"namespaces/{namespace}/serviceaccounts/{service_account}/token",
            data=json.dumps(request),
        )
        status = answer.get("status") or {}
        try:
            expires = datetime.fromisoformat(
                str(status["expirationTimestamp"]).replace("Z", "+00:00")
            )
            return str(status["token"]), expires
        except (KeyError, ValueError) as exc:
            raise KubeError(0, f"TokenRequest answered without a token: {exc}") from exc

    def image_uids_blocking(self, namespaces: list[str]) -> set[str]:
        """The uids of every NixImage (in ``namespaces``; empty: the whole cluster), read
        with paginated LIST requests."""
        paths = (
            [f"namespaces/{namespace}/{podspec.PLURAL}" for namespace in namespaces]
            if namespaces
            else [podspec.PLURAL]
        )
        uids: set[str] = set()
        for path in paths:
            token = ""
            while True:
                params = {"limit": "500", **({"continue": token} if token else {})}
                page = self._call_blocking(
                    "get", version=podspec.API_VERSION, url=path, params=params
                )
                uids.update(item["metadata"]["uid"] for item in page.get("items", ()))
                token = (page.get("metadata") or {}).get("continue") or ""
                if not token:
                    break
        return uids

    async def _patch_pod(
        self, namespace: str, name: str, operations: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return await self._call(
            "patch",
            version="v1",
            namespace=namespace,
            url=f"pods/{name}",
            data=json.dumps(operations),
            headers={"Content-Type": JSON_PATCH},
        )

    async def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return await asyncio.to_thread(self._call_blocking, method, **kwargs)

    def _call_blocking(self, method: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = getattr(self.api, method)(**kwargs)
        except requests.RequestException as exc:
            raise KubeError(0, f"Kubernetes API unreachable: {exc}") from exc
        if response.ok:
            result: dict[str, Any] = response.json()
            return result
        message = _status_message(response)
        if response.status_code == 409 and method == "post":
            raise AlreadyExists(409, message)
        raise KubeError(response.status_code, message)


def _status_message(response: requests.Response) -> str:
    try:
        return str(response.json().get("message") or response.reason)
    except ValueError:
        return response.text[:500] or str(response.reason)
