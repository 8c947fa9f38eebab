"""Packing in child processes: ``ProcessPacker`` runs ``LayerJob``s in plain child
interpreters and relays their compressed bytes to each job's sink in this process.

Starts and talks to subprocesses over pipes; imports errors, entries, packing and streaming.

A worker is a plain child interpreter (not multiprocessing: that re-imports the caller's
main module in every child and needs the ``if __name__ == "__main__"`` idiom everywhere)
running ``_serve``. Parent → worker on stdin: one frame per job, a pickled LayerJob
without its sink. Worker → parent on stdout: data frames with compressed bytes, then one
result frame (the PackedLayer) or error frame (the exception). Frame = kind byte, 8-byte
big-endian length, payload. Both sides are this module, so pickle is fine.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import BinaryIO

from niximage_builder.errors import NixImageError
from niximage_builder.tarball.entries import PackError
from niximage_builder.tarball.packing import LayerJob
from niximage_builder.tarball.streaming import PackedLayer

_FRAME = struct.Struct(">cQ")
_JOB, _DATA, _RESULT, _ERROR = b"J", b"D", b"R", b"E"
# builder/niximage_builder/tarball/workers.py → builder/: what the worker puts on sys.path
_BUILDER_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from niximage_builder.tarball.workers import _serve; _serve()"
)


def _write_frame(stream: BinaryIO, kind: bytes, payload: bytes) -> None:
    stream.write(_FRAME.pack(kind, len(payload)))
    stream.write(payload)


def _read_frame(stream: BinaryIO) -> tuple[bytes, bytes] | None:
    """The next frame, or None at a clean end of stream."""
    head = stream.read(_FRAME.size)
    if not head:
        return None
    if len(head) != _FRAME.size:
        raise EOFError("truncated frame header")
    kind, length = _FRAME.unpack(head)
    payload = stream.read(length)
    if len(payload) != length:
        raise EOFError("truncated frame")
    return kind, payload


class _FrameSink:
    """The worker's sink: each compressed chunk becomes one data frame."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        _write_frame(self._stream, _DATA, data)


class _NoSink:
    """Stands in for the parent's sink in the job sent to a worker."""

    def write(self, data: bytes) -> None:
        raise AssertionError("a worker writes frames, never to the job's sink")


def _serve() -> None:
    """The worker's main loop. Its own stdout becomes stderr so no stray print can corrupt
    the frames, which go to the original stdout descriptor."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    jobs = os.fdopen(0, "rb")
    while (frame := _read_frame(jobs)) is not None:
        job: LayerJob = pickle.loads(frame[1])
        try:
            packed = job.run(_FrameSink(out))
        except NixImageError as err:
            _write_frame(out, _ERROR, _pickled_error(err))
        except Exception as err:  # anything else still reaches the parent as a PackError
            _write_frame(out, _ERROR, pickle.dumps(PackError(f"{type(err).__name__}: {err}")))
        else:
            _write_frame(out, _RESULT, pickle.dumps(packed))
        out.flush()


def _pickled_error(err: NixImageError) -> bytes:
    try:
        return pickle.dumps(err)
    except Exception:  # an error with a custom constructor may not pickle: keep the message
        return pickle.dumps(PackError(str(err)))


class _Worker:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-P", "-c", _BOOT, _BUILDER_ROOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.idle = True
        """False while a job's frames may still be in the pipe: not reusable then."""

    def pack(self, job: LayerJob) -> PackedLayer:
        """Send the job, relay data frames to the sink, return the result or raise."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        child_job = LayerJob(_NoSink(), tuple(job.paths), job.entries, job.compression, job.level)
        self.idle = False
        _write_frame(stdin, _JOB, pickle.dumps(child_job))
        stdin.flush()
        while (frame := _read_frame(stdout)) is not None:
            kind, payload = frame
            if kind == _DATA:
                job.sink.write(payload)
                continue
            self.idle = True
            try:
                outcome = pickle.loads(payload)
            except Exception as err:  # e.g. an error class whose constructor differs
                raise PackError(f"unreadable answer from a packing worker: {err}") from None
            if kind == _ERROR:
                raise outcome
            return outcome  # type: ignore[no-any-return]
        raise EOFError("worker ended")

    def close(self) -> None:
        if self.process.stdin:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


class ProcessPacker:
    """Up to ``workers`` child interpreters that pack layers; ``pack`` is thread-safe.

    A worker is started on first need (0.1-0.5 s: an interpreter importing this module)
    and reused for later jobs; one whose job failed on our side (the sink raised) or that
    died is discarded and replaced. Use as a context manager; leaving it ends the workers.
    A pipeline that already runs a thread per layer keeps its threads and calls
    ``packer.pack(LayerJob(writer, paths, compression=...))`` instead of ``pack_paths``.
    """

    def __init__(self, workers: int | None = None) -> None:
        self._limit = threading.BoundedSemaphore(workers or os.cpu_count() or 1)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def pack(self, job: LayerJob) -> PackedLayer:
        with self._limit:
            worker = self._take()
            try:
                return worker.pack(job)
            except (EOFError, BrokenPipeError) as err:
                code = worker.process.poll()
                raise PackError(f"packing worker failed ({err}; exit code {code})") from None
            finally:  # after a sink failure the worker is mid-job: not reusable
                self._give_back(worker, worker.idle)

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise PackError("the ProcessPacker is closed")
            if self._idle:
                return self._idle.pop()
        return _Worker()

    def _give_back(self, worker: _Worker, reusable: bool) -> None:
        with self._lock:
            if reusable and not self._closed:
                self._idle.append(worker)
                return
        if not reusable:
            worker.process.kill()
        worker.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()

    def __enter__(self) -> ProcessPacker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
