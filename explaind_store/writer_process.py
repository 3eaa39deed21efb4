"""Writer process: the chunk writer in its own interpreter, so that encoding and writing never take the training
process's GIL.

The training thread copies each update's parameters and optimizer state straight into a chunk buffer in shared
memory (one foreach copy per update, as for the thread writer); at each chunk end it copies the chunk's remaining
small per-update records into a shared-memory slot and sends a small JSON message naming the slot and where the
buffer's blocks lie; the process writes and commits the chunk with
:func:`chunkio.write_chunk` (the same code as the thread writer, so the commit order is the same: the committed
update count advances only after the chunk's data is written) and answers with the committed count, which frees the
slot. At most ``queue_size`` chunks are in flight; then the training thread waits, as with the thread writer.

Design choices, and why:

- The process is a fresh interpreter started with ``subprocess`` (the equivalent of the 'spawn' start method,
  never fork, which is unsafe with torch's threads), running only this module through a stub package: it never
  imports the training script (so scripts without an ``if __name__ == "__main__":`` guard, stdin-piped code,
  notebooks and pytest all work) nor torch (so it starts in well under a second).
- Shared memory is ``memfd`` (anonymous files) passed over a Unix socket: nothing is named in ``/dev/shm``, so a
  crash of either side cannot leak a segment.
- The store's lock (an ``flock`` on the store directory) is inherited by the process: if the training process dies,
  the store stays locked until the writer has stopped, so a resume never races a write.
- If the training process dies, the writer sees its socket close and stops at once; what it had committed stays
  committed. If the writer dies or fails, the training process raises :class:`~explaind_store.writer.WriterError`
  at its next ``put``/``flush``/``close`` with the cause (the writer's traceback, or its exit status).
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import chunkio, schema
from .chunkio import BufferRow, WriterError

_RECV = 1 << 16  # messages are small JSON; chunk data travels through shared memory
_STARTUP_S = 120.0  # how long the first answer of a starting process may take (a busy machine, a cold disk)

# Run in the child: `explaind_store` as a bare namespace over this directory, so its __init__ (which imports torch
# and the whole package) never runs there.
_BOOTSTRAP = (
    "import sys, types; pkg = types.ModuleType('explaind_store'); pkg.__path__ = [sys.argv[1]]; "
    "sys.modules['explaind_store'] = pkg; from explaind_store.writer_process import child_main; "
    "child_main(*sys.argv[2:])"
)


def store_dir(root: zarr.Group) -> Path | None:
    """The local directory of ``root``'s store, or None when the store is not a local directory (the writer
    process opens the store itself, so it needs a path another process can open)."""
    from zarr.storage import LocalStore

    store = root.store
    if isinstance(store, LocalStore):
        return Path(store.root) / root.path if root.path else Path(store.root)
    return None


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


class WriterProcessFailed(RuntimeError):
    """What went wrong inside the writer process: ``summary`` in one line, the message with its traceback."""

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or message


class ProcessChunkWriter:
    """The :class:`~explaind_store.writer.ChunkWriter` interface (``put``/``flush``/``close``/``raise_if_failed``/
    ``busy_seconds``/``bytes_written``) with the encoding and writing done by a separate process."""

    def __init__(
        self,
        root: zarr.Group,
        arrays: dict[str, zarr.Array],
        batch_array: zarr.Array,
        chunk_updates: int,
        *,
        queue_size: int = 4,
        check_finite: bool = True,
        packs: dict[str, list[Any]] | None = None,
        encode_attrs: Any = None,
        lock_fd: int | None = None,
    ) -> None:
        path = store_dir(root)
        if path is None:
            raise WriterError(
                f"the writer process needs a store in a local directory, and this one is {root.store!r}; "
                "record with writer='thread'."
            )
        if not hasattr(os, "memfd_create"):
            raise WriterError("the writer process needs Linux shared memory (os.memfd_create); use writer='thread'.")
        self.root = root
        self.k = chunk_updates
        self._packs = packs or {}
        self.encode_attrs = encode_attrs
        self.bytes_written = 0
        self.busy_seconds = 0.0  # time the writer process spent encoding and writing
        self.cpu_seconds = 0.0  # CPU time of the writer process (all its threads), as of its last answer
        self.nonfinite: list[int] = list(root.attrs.get(schema.ATTR_NONFINITE, []))
        self.committed = int(root.attrs.get(schema.ATTR_COMMITTED, -1))
        self._arrays = arrays
        self._staged: list[Any] = []
        self._error: BaseException | None = None
        self._slots: dict[int, mmap.mmap] = {}
        self._free: list[int] = []
        # Chunk buffers in shared memory (see ChunkWriter.row_buffer): the training thread copies each row straight
        # into one, and the process reads the blocks from there (no copy at the chunk end). Each lives in a slot of
        # its own; one is free again once the process has committed the chunk whose rows it holds.
        self._current: Any = None  # the buffer rows are being copied into
        self._free_buffers: list[Any] = []
        self._buffer_slot: dict[int, int] = {}  # id(buffer) -> its slot
        self._pending_buffers: dict[int, list[Any]] = {}  # message slot -> buffers it reads, until committed
        self._buffers_made = 0
        self._in_flight = 0
        self._max_in_flight = max(2, queue_size)
        self._next_slot = 0
        self._token = 0
        self._stopped = False
        self._sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = [child_sock.fileno()] + ([lock_fd] if lock_fd is not None else [])
        args = {
            "store": str(path),
            "arrays": list(arrays),
            "batch": batch_array.path,
            "check_finite": check_finite,
            "codec_pipeline": zarr.config.get("codec_pipeline.path"),
        }
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(Path(__file__).parent), str(child_sock.fileno()),
                 json.dumps(args)],
                pass_fds=fds, stdin=subprocess.DEVNULL,
            )
        finally:
            child_sock.close()
        self._wait_for("ready", _STARTUP_S)
        self.raise_if_failed()

    @property
    def pid(self) -> int:
        """The writer process's id."""
        return self._proc.pid

    @property
    def packs(self) -> dict[str, list[Any]]:
        """pack name -> where each array's values sit in a packed row (as :attr:`ChunkWriter.packs`)."""
        return self._packs

    @packs.setter
    def packs(self, packs: dict[str, list[Any]]) -> None:
        # a new layout (called while idle, after a flush): buffers laid out for the old one are not reused; their
        # slots stay mapped until close
        self._packs = packs
        self._current, self._free_buffers, self._buffers_made = None, [], 0

    # --- the arrays the process writes (the recorder changes them while the writer is idle) ---------------------
    @property
    def arrays(self) -> dict[str, zarr.Array]:
        return self._arrays

    @arrays.setter
    def arrays(self, arrays: dict[str, zarr.Array]) -> None:
        self._arrays = arrays
        self.raise_if_failed()
        _send(self._sock, {"op": "reopen", "arrays": list(arrays)})

    # --- producer side (training thread) -------------------------------------------------------------------------
    def put(self, row: Any) -> None:
        if self._error is not None:
            self.raise_if_failed()
        self._staged.append(row)
        if (row.index + 1) % self.k == 0:
            self._hand_over()

    def row_buffer(self, make: Any, nbytes: int) -> Any:
        """The chunk buffer the next row is copied into, as :meth:`ChunkWriter.row_buffer`, with its blocks laid
        by ``make(memory)`` in ``nbytes`` of shared memory that the process maps too."""
        if self._current is None:
            while not self._free_buffers and self._buffers_made >= self._max_in_flight + 2:
                self._wait_for("committed")  # memory stays bounded: wait for the process to free one
                self.raise_if_failed()
            if self._free_buffers:
                self._current = self._free_buffers.pop()
            else:
                sid = self._new_slot(nbytes)
                self._current = make(self._slots[sid])
                self._buffer_slot[id(self._current)] = sid
                self._buffers_made += 1
        return self._current

    def flush(self) -> None:
        """Block until everything put so far is written and committed."""
        self.raise_if_failed()
        self._hand_over()
        self._token += 1
        self._send({"op": "flush", "token": self._token})
        self._wait_for("flushed")
        self.raise_if_failed()

    def close(self) -> None:
        if not self._stopped:
            self._stopped = True
            try:
                if self._error is None:
                    self._hand_over()
                    self._send({"op": "stop"})
                    self._wait_for("stopped")
            except BaseException:
                if self._error is None:
                    raise
            finally:
                self._shut_down()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self._error is None and not self._stopped:
            self._drain(block=False)
        if self._error is not None:
            raise WriterError(
                f"writing the trajectory failed: {getattr(self._error, 'summary', self._error)}. Updates up to "
                f"committed_updates="
                f"{self._committed_on_disk()} are safe on disk; resume with resume=True (`--resume` on the command "
                "line)."
            ) from self._error

    # --- internals ------------------------------------------------------------------------------------------------
    def _committed_on_disk(self) -> Any:
        try:
            return zarr.open_group(self.root.store_path, mode="r").attrs.get(schema.ATTR_COMMITTED)
        except Exception:  # noqa: BLE001 - only for the message
            return self.committed

    def _send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        try:
            _send(self._sock, msg, fds)
        except OSError as exc:
            self._died(exc)
            self.raise_if_failed()

    def _hand_over(self) -> None:
        # the process reads the staged rows' buffer now: the next row starts another
        current, self._current = self._current, None
        if not self._staged:
            if current is not None:
                self._free_buffers.append(current)
            return
        rows, self._staged = self._staged, []
        _to_numpy = chunkio.to_numpy

        i0, n = rows[0].index, len(rows)
        if [r.index for r in rows] != list(range(i0, i0 + n)):
            raise WriterError(f"steps {[r.index for r in rows]} are not consecutive")
        for r in rows:
            if r.ready is not None:
                r.ready.synchronize()
        # layout: each source is (offset, rows of one array or pack); entries say how the process views them
        sources: list[tuple[int, list[np.ndarray]]] = []
        entries: list[list[Any]] = []
        offset = 0

        def place(values: list[np.ndarray]) -> int:
            nonlocal offset
            start = -(-offset // 64) * 64  # cache-line aligned
            sources.append((start, values))
            offset = start + sum(v.nbytes for v in values)
            return start

        covered: set[str] = set()
        buffers: dict[int, Any] = {}
        for name, segments in self.packs.items():
            first = rows[0].packed.get(name)
            if isinstance(first, BufferRow) and all(
                isinstance(v, BufferRow) and v.buffer is first.buffer and v.j == first.j + i
                for i, v in enumerate(r.packed.get(name) for r in rows)
            ):  # consecutive rows of one shared-memory chunk buffer: the process reads them where they lie
                buf = first.buffer
                buffers[id(buf)] = buf
                for s in segments:
                    block = buf.blocks[s.path]
                    entries.append([s.path, block.dtype.str, [n, *s.shape],
                                    buf.offsets[s.path] + first.j * block.strides[0], None,
                                    self._buffer_slot[id(buf)]])
                    covered.add(s.path)
                continue
            if not all(name in r.packed for r in rows) or any(isinstance(r.packed[name], BufferRow) for r in rows):
                for r in rows:  # some rows were copied per tensor (or into other buffers): unpack row by row
                    if name in r.packed:
                        v = r.packed.pop(name)
                        if isinstance(v, BufferRow):
                            buffers[id(v.buffer)] = v.buffer
                            r.arrays.update({s.path: v.buffer.blocks[s.path][v.j] for s in segments})
                            continue
                        one = _to_numpy(v)
                        r.arrays.update({s.path: one[s.start : s.stop].reshape(s.shape) for s in segments})
                continue
            flat = [_to_numpy(r.packed[name]) for r in rows]
            start, width, dt = place(flat), flat[0].size, flat[0].dtype
            for s in segments:
                inner = np.empty(s.shape, dtype=dt).strides if s.shape else ()
                entries.append([s.path, dt.str, [n, *s.shape], start + s.start * dt.itemsize,
                                [width * dt.itemsize, *inner]])
                covered.add(s.path)
        for path in self._arrays:
            if path not in covered:
                vals = [np.asarray(_to_numpy(r.arrays[path])) for r in rows]
                arr = self._arrays[path]
                bad = [(r.index, v) for r, v in zip(rows, vals) if v.shape != arr.shape[1:] or v.dtype != arr.dtype]
                if bad:  # the rows are copied as bytes below: refuse what would be cast, broadcast or garbled
                    s, v = bad[0]
                    self._error = WriterError(
                        f"update {s} gave {path} as {v.dtype} of shape {v.shape}, but the store holds it as "
                        f"{arr.dtype} of shape {arr.shape[1:]} (the tensor's dtype or shape changed during the run, "
                        "e.g. an optimizer state replaced by hand); keep every recorded tensor's dtype and shape fixed"
                    )
                    self.raise_if_failed()
                start = place(vals)
                entries.append([path, vals[0].dtype.str, [n, *vals[0].shape], start, None])
        batch = chunkio.batch_block([r.batch for r in rows])
        batch_at = place([batch])
        attrs = dict(rows[-1].commit_attrs)
        if self.encode_attrs is not None:
            attrs = self.encode_attrs(attrs)
        header = json.dumps({"i0": i0, "entries": entries, "batch": [batch_at, list(batch.shape)],
                             "attrs": attrs}).encode()
        header_at = -(-offset // 64) * 64
        sid = self._slot(header_at + len(header))
        mm = self._slots[sid]
        for start, values in sources:
            stride = values[0].nbytes
            view = np.ndarray((len(values), stride), dtype=np.uint8, buffer=mm, offset=start)
            for j, v in enumerate(values):
                view[j] = np.ascontiguousarray(v).reshape(-1).view(np.uint8)
        mm[header_at : header_at + len(header)] = header
        self._send({"op": "chunk", "slot": sid, "header": [header_at, len(header)]})
        self._pending_buffers[sid] = list(buffers.values())
        if current is not None and id(current) not in buffers:
            self._free_buffers.append(current)
        self._in_flight += 1

    def _slot(self, size: int) -> int:
        """A free shared-memory slot of at least ``size`` bytes (waits while ``queue_size`` chunks are in flight)."""
        while self._in_flight >= self._max_in_flight:
            self._wait_for("committed")
            self.raise_if_failed()
        while self._free:
            sid = self._free.pop()
            if len(self._slots[sid]) >= size:
                return sid
            self._slots.pop(sid).close()
            self._send({"op": "drop", "slot": sid})
        return self._new_slot(max(size * 5 // 4, 1 << 16))  # headroom: the next chunk's batches may be wider

    def _new_slot(self, size: int) -> int:
        """A new shared-memory slot of ``size`` bytes, mapped here and in the process."""
        sid, self._next_slot = self._next_slot, self._next_slot + 1
        size = max(size, 1)
        fd = os.memfd_create(f"explaind-writer-{sid}", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.ftruncate(fd, size)
            self._slots[sid] = mmap.mmap(fd, size)
            self._send({"op": "slot", "slot": sid, "size": size}, [fd])
        finally:
            os.close(fd)
        return sid

    def _wait_for(self, what: str, timeout: float | None = None) -> None:
        """Handle the process's answers until one of kind ``what`` arrives (or the process fails)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._error is None:
            if self._drain(block=True, until=what):
                return
            if deadline is not None and time.monotonic() > deadline:
                self._died(TimeoutError(f"the writer process did not answer within {timeout:.0f} s"))

    def _drain(self, block: bool, until: str | None = None) -> bool:
        """Handle the process's answers: all that are waiting (``block=False``), or until one of kind ``until``
        was handled (True) or the process failed (False)."""
        while True:
            ready, _, _ = select.select([self._sock], [], [], 0.5 if block else 0)
            if not ready:
                if not block:
                    return False
                if self._proc.poll() is not None:
                    self._died(None)
                    return False
                continue
            try:
                data, err = self._sock.recv(_RECV), None
            except OSError as exc:
                data, err = b"", exc
            if not data:
                self._died(err)
                return False
            op = self._handle(json.loads(data))
            if op == "error":
                return False
            if until is not None and op == until:
                return True

    def _handle(self, msg: dict[str, Any]) -> str:
        """Take in one answer of the process; returns its kind."""
        op = msg["op"]
        if op == "committed":
            self.committed = msg["committed"]
            self.bytes_written += msg["bytes"]
            self.busy_seconds += msg["busy"]
            self.nonfinite = msg["nonfinite"]
            # what the process wrote to the root attributes, mirrored in memory (readers of self.root here)
            self.root.metadata.attributes.update(msg["attrs"])
            self._free.append(msg["slot"])
            self._free_buffers += self._pending_buffers.pop(msg["slot"], [])
            self._in_flight -= 1
        elif op == "error":
            tb = msg["traceback"].rstrip()
            last = tb.splitlines()[-1] if tb else "unknown error"
            self._error = WriterProcessFailed(
                "the writer process failed; its traceback:\n" + tb, f"the writer process failed with {last}"
            )
        if "cpu" in msg:
            self.cpu_seconds = msg["cpu"]
        return op

    def _salvage(self) -> None:
        """Read what the exited process sent before it went. A process that exits with messages of ours unread
        resets the connection, and the kernel reports that reset before the answers still queued (its traceback
        among them), so one failed read does not mean nothing is left."""
        for _ in range(1 << 12):
            try:
                data = self._sock.recv(_RECV, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                continue  # the reset itself, reported once
            if not data:
                return
            try:
                msg = json.loads(data)
            except ValueError:
                return
            if self._handle(msg) == "error":
                return

    def _died(self, cause: BaseException | None) -> None:
        if self._error is not None:
            return
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._salvage()
        if self._error is not None:
            return
        if code is not None and code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        elif code is not None:
            how = f"exited with status {code}"
        else:
            how = "stopped answering"
        self._error = WriterProcessFailed(
            f"the writer process (pid {self._proc.pid}) {how}" + (f" ({cause!r})" if cause else "")
        )

    def _shut_down(self) -> None:
        self._sock.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        # the chunk buffers' tensors export their slots' memory: drop them before unmapping
        self._current, self._free_buffers, self._pending_buffers = None, [], {}
        self._staged = []
        for mm in self._slots.values():
            try:
                mm.close()
            except BufferError:  # views still alive, maybe in a reference cycle: collect, then try once more
                gc.collect()
                try:
                    mm.close()
                except BufferError:  # a row still referenced elsewhere: unmapped when it is collected
                    pass
        self._slots.clear()

    def __del__(self) -> None:
        # a writer dropped without close(): stop the process (it sees its socket close) and reap it
        try:
            if not self._stopped:
                self._stopped = True
                self._shut_down()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# --- the writer process ------------------------------------------------------------------------------------------
class _Child:
    def __init__(self, args: dict[str, Any]) -> None:
        if args.get("codec_pipeline"):
            zarr.config.set({"codec_pipeline.path": args["codec_pipeline"]})
        self.store = args["store"]
        self.batch_path = args["batch"]
        self.check_finite = bool(args["check_finite"])
        self.slots: dict[int, mmap.mmap] = {}
        self.busy = 0.0
        self.open(args["arrays"])
        self.nonfinite = list(self.root.attrs.get(schema.ATTR_NONFINITE, []))

    def open(self, paths: list[str]) -> None:
        from .storage import writable

        self.root = zarr.open_group(self.store, mode="r+", zarr_format=3)
        self.arrays = {p: writable(self.root[p]) for p in paths}
        self.batch_array = writable(self.root[self.batch_path])

    def trim(self) -> None:
        """The arrays back to the committed steps (the writer grows them ahead)."""
        root = zarr.open_group(self.store, mode="r", zarr_format=3)
        self.open(list(self.arrays))  # the training process may have resized some meanwhile
        chunkio.trim([*self.arrays.values(), self.batch_array], int(root.attrs[schema.ATTR_COMMITTED]) + 1)

    def chunk(self, sid: int, header_at: int, header_len: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        mm = self.slots[sid]
        h = json.loads(bytes(mm[header_at : header_at + header_len]))
        # an entry's sixth field, where present, is the slot of the chunk buffer its block lies in
        blocks = {
            path: np.ndarray(tuple(shape), dtype=np.dtype(dt), buffer=self.slots[where[0]] if where else mm,
                             offset=off, strides=None if strides is None else tuple(strides))
            for path, dt, shape, off, strides, *where in h["entries"]
        }
        b_at, b_shape = h["batch"]
        batch = np.ndarray(tuple(b_shape), dtype=np.int64, buffer=mm, offset=b_at)
        # the root's attributes as on disk now: the training process may have changed some while this was idle
        self.root = zarr.open_group(self.store, mode="r+", zarr_format=3)
        nbytes = chunkio.write_chunk(
            self.root, self.arrays, self.batch_array, h["i0"], blocks, batch, h["attrs"], self.nonfinite,
            check_finite=self.check_finite,
        )
        del blocks, batch  # views of the slot, which the training process reuses once answered
        busy = time.perf_counter() - t0
        attrs = {**h["attrs"], schema.ATTR_NONFINITE: sorted(self.nonfinite),
                 schema.ATTR_COMMITTED: h["i0"] + b_shape[0] - 1}
        return {"op": "committed", "slot": sid, "committed": attrs[schema.ATTR_COMMITTED], "bytes": nbytes,
                "busy": busy, "cpu": time.process_time(), "nonfinite": sorted(self.nonfinite), "attrs": attrs}


def child_main(sock_fd: str, args_json: str) -> None:
    """Entry point of the writer process (see the module docstring); not for direct use."""
    # Ctrl-C in a terminal reaches the whole process group: the training process decides (its close() still
    # flushes what was handed over), so the writer must not die of it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # chunkio encodes whole chunks in this, the main thread, where Blosc would start its own threads: one thread,
    # as in the thread writer, so encoding does not take both cores from the training process's torch threads
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False
    sock = socket.socket(fileno=int(sock_fd))
    child: _Child | None = None
    try:
        child = _Child(json.loads(args_json))
        _send(sock, {"op": "ready"})
        while True:
            data, fds, _, _ = socket.recv_fds(sock, _RECV, 4)
            if not data:  # the training process is gone: stop; what was committed stays committed
                return
            msg = json.loads(data)
            op = msg["op"]
            if op == "slot":
                child.slots[msg["slot"]] = mmap.mmap(fds[0], msg["size"])
                os.close(fds[0])
            elif op == "drop":
                child.slots.pop(msg["slot"]).close()
            elif op == "chunk":
                _send(sock, child.chunk(msg["slot"], *msg["header"]))
            elif op == "reopen":
                child.open(msg["arrays"])
            elif op == "flush":
                _send(sock, {"op": "flushed", "token": msg["token"]})
            elif op == "stop":
                child.trim()
                _send(sock, {"op": "stopped", "cpu": time.process_time()})
                return
    except BaseException:  # noqa: BLE001 - reported to the training process, which raises it
        try:
            _send(sock, {"op": "error", "traceback": traceback.format_exc()[-8000:]})
        except OSError:
            pass
        sys.exit(1)
