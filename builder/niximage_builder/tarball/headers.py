"""Tar headers: one ``Entry`` → its ustar header block, with a PAX extended header before it
when ustar cannot hold the name, link target or size.

Pure; imports entries only. Also owns the record size and the zero blocks that pad file
contents and end the archive.
"""

from __future__ import annotations

import os
from functools import cache
from zlib import adler32

from niximage_builder.tarball.entries import Entry

MTIME = 1
"""The mtime of every entry: Nix's own epoch (store files have mtime 1)."""

RECORD = 512
"""The tar block size: headers are one record, file contents are padded to whole records."""
ZEROS = bytes(RECORD * 2)
"""Two zero records: the end of an archive; a slice of it pads a file's contents."""

_MAX_USTAR_SIZE = 0o77777777777  # 11 octal digits: 8 GiB - 1
_TYPEFLAGS: dict[str, bytes] = {"file": b"0", "symlink": b"2", "dir": b"5"}
# ustar fields, 512 bytes: name 100, mode 8, uid 8, gid 8, size 12, mtime 12, chksum 8,
# typeflag 1, linkname 100, magic 6 + version 2, uname 32, gname 32, devmajor 8,
# devminor 8, prefix 155, padding 12.
_IDS = b"%07o\0" % 0 * 2  # uid, gid
_MTIME_FIELD = b"%011o\0" % MTIME
_MAGIC_TO_DEVICES = b"ustar\x0000" + bytes(64) + b"%07o\0" % 0 * 2
_PAD = bytes(12)
_CHECKSUM_BLANK = b" " * 8
_PAX_NAME = b"././@PaxHeader"


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) fields for a ustar header, or None when a PAX path is needed.

    The shortest prefix that works is taken (as Python's tarfile does): deterministic.
    """
    if len(name) <= 100:
        return b"", name
    start = 0
    while (cut := name.find(b"/", start, 156)) != -1:
        rest = name[cut + 1 :]
        if 0 < len(rest) <= 100:
            return name[:cut], rest
        start = cut + 1
    return None


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """``"<len> <keyword>=<value>\\n"`` where len counts the whole record, itself included."""
    body = len(keyword) + len(value) + 3
    length = previous = 0
    while True:
        length = body + len(str(previous))
        if length == previous:
            break
        previous = length
    return b"%d %s=%s\n" % (length, keyword, value)


def _checksum(header: bytes) -> int:
    """Sum of the header's bytes, via adler32: its low half is 1 + the byte sum mod 65521,
    exact for 256 bytes (at most 65280), so two halves give the sum ~6× faster than sum()."""
    return (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) - 2


def _ustar(
    name: bytes, prefix: bytes, mode: int, size: int, typeflag: bytes, linkname: bytes
) -> bytes:
    """One ustar header block. Hot (once per entry): assembled from constant pieces."""
    header = b"".join(
        (
            name.ljust(100, b"\0"),
            _mode_field(mode),
            _IDS,
            b"%011o\0" % size,
            _MTIME_FIELD,
            _CHECKSUM_BLANK,
            typeflag,
            linkname.ljust(100, b"\0"),
            _MAGIC_TO_DEVICES,
            prefix.ljust(155, b"\0"),
            _PAD,
        )
    )
    return header[:148] + b"%06o\0 " % _checksum(header) + header[156:]


@cache
def _mode_field(mode: int) -> bytes:
    return b"%07o\0" % mode


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def tar_header(entry: Entry) -> bytes:
    """The header block(s) of one entry: a PAX extended header when ustar cannot hold it."""
    name = os.fsencode(entry.name) + (b"/" if entry.kind == "dir" else b"")
    link = os.fsencode(entry.target) if entry.kind == "symlink" else b""
    size = entry.size if entry.kind == "file" else 0
    records: list[tuple[bytes, bytes]] = []
    split = _split_ustar(name)
    if split is None:
        records.append((b"path", name))
        split = b"", name[:100]
    if len(link) > 100:
        records.append((b"linkpath", link))
        link = link[:100]
    if size > _MAX_USTAR_SIZE:
        records.append((b"size", b"%d" % size))
        size = 0
    header = _ustar(split[1], split[0], entry.mode, size, _TYPEFLAGS[entry.kind], link)
    if not records:
        return header
    if not all(_is_utf8(value) for _, value in records):
        records.insert(0, (b"hdrcharset", b"BINARY"))  # raw bytes, as POSIX allows
    payload = b"".join(_pax_record(k, v) for k, v in records)
    pax = _ustar(_PAX_NAME, b"", 0o644, len(payload), b"x", b"")
    return pax + payload + ZEROS[: -len(payload) % RECORD] + header
