"""A minimal client of the CRI image service, the calls a kubelet makes to containerd.

crictl is not packaged in Debian 12, and the CRI protobuf stubs are not on PyPI, so the
few messages needed are encoded here by hand (field numbers from the CRI ``api.proto``,
``runtime.v1``) and sent with grpcio as raw bytes over containerd's unix socket.
Import as ``tests.registry.cri``.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

SERVICE = "/runtime.v1.ImageService/"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, nested messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _image_spec(reference: str) -> bytes:
    return _field(1, reference.encode())  # ImageSpec.image


def _decode(data: bytes) -> dict[int, list[bytes | int]]:
    """Fields of one message: number → values (bytes for length-delimited, int for varint)."""
    fields: dict[int, list[bytes | int]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
            fields.setdefault(number, []).append(value)
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            fields.setdefault(number, []).append(data[pos : pos + size])
            pos += size
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return fields


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


@dataclass(frozen=True)
class ImageStatus:
    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    size: int


class Cri:
    """PullImage, ImageStatus and RemoveImage, as the kubelet calls them."""

    def __init__(self, socket: str) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket}")

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: bytes, timeout: float = 120) -> bytes:
        call = self._channel.unary_unary(SERVICE + method)
        return bytes(call(request, timeout=timeout))

    def pull(self, reference: str, username: str = "", password: str = "") -> str:
        """Pull like a kubelet (with a pull secret's user and password); the image id."""
        request = _field(1, _image_spec(reference))
        if username:
            # AuthConfig: username = 1, password = 2. The kubelet leaves server_address
            # empty for a pull secret's entry (containerd 1.6 cannot parse "host:port").
            request += _field(2, _field(1, username.encode()) + _field(2, password.encode()))
        response = _decode(self._call("PullImage", request))
        return bytes(response[1][0]).decode()  # PullImageResponse.image_ref

    def status(self, reference: str) -> ImageStatus | None:
        response = _decode(self._call("ImageStatus", _field(1, _image_spec(reference))))
        if 1 not in response:
            return None  # no such image
        image = _decode(bytes(response[1][0]))  # ImageStatusResponse.image
        size = image.get(4, [0])[0]
        return ImageStatus(
            id=bytes(image[1][0]).decode(),
            repo_tags=[bytes(tag).decode() for tag in image.get(2, [])],
            repo_digests=[bytes(digest).decode() for digest in image.get(3, [])],
            size=int(size) if isinstance(size, int) else 0,
        )

    def remove(self, reference: str) -> None:
        self._call("RemoveImage", _field(1, _image_spec(reference)))
