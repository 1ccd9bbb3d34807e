"""Shared memory between a gateway and the shards on its host: lookups without copies.

Over a socket a lookup's ids are copied into the kernel and out again, and its pooled reply
(~0.5 MB for 256 samples of 7 tables) twice more, each side waking a ZeroMQ I/O thread for
it. A shard on the gateway's own host can instead read the ids from, and pool straight into,
memory the two processes share; the message itself carries only offsets.

The client side (``Arena``) is a file under ``/dev/shm`` the client creates, owns and maps,
named ``recserve-<pid>-<random>``, starting with a random 16-byte key. A lookup takes one
region of it (first fit; ids, lengths, weights, then the reply's floats) until the caller is
done with the reply (the last view of it is gone); a region whose lookup timed out stays
taken until the shard's late reply says the shard is done with it, and once a quarter of
the arena waits so (a shard killed with lookups in flight never answers) the client unlinks
it and starts another. When no region is free the lookup goes over the socket as before:
the arena never costs a lookup. The client holds a shared ``flock`` on its file while it
lives; ``remove_stale`` removes only files nobody holds (a killed client's).

The shard side (``Maps``) opens an arena the first time a lookup names it, only under
``/dev/shm/recserve-``, owned by the shard's own user, with every page allocated (the client
allocates them all up front: a write into a hole of a full ``/dev/shm`` is SIGBUS), and only
if the file starts with the key the lookup quotes, so a peer cannot make a shard read or
write a file it could not write itself. The shard copies the ids out before checking them
(the client could change them under it), and writes only the reply region the lookup names,
inside the file. A shard that cannot open it (another host, another mount namespace, another
user) answers ``shm_unavailable``, and that client goes back to frames for good. When a new
client comes, the shard lets go of the arenas whose file is gone (their pages stay in
memory while mapped).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np

from recserve.contracts.errors import BadRequest, SharedMemoryUnavailable
from recserve.rpc.wire import IntoSpec, ShmSpec

DIR = Path("/dev/shm")
PREFIX = "recserve-"
KEY_BYTES = 16
ALIGN = 64  # every region starts on a cache line
MAX_ARENA = 1 << 30  # the largest arena a shard maps
MAPS_KEPT = 64  # arenas a shard keeps mapped (the least recently used is dropped)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def remove_stale(directory: Path = DIR) -> int:
    """Remove the arenas of processes that are gone (a SIGKILLed gateway leaves its files);
    the number removed.

    An arena's owner holds a shared ``flock`` on it while it lives (the kernel drops it when
    the process dies, however it dies), so a file some process still locks is kept even
    when its name's pid means nothing here: a gateway in another PID namespace sharing this
    ``/dev/shm``. A file nobody locks is removed only if its pid is not alive here either
    (arenas made before the locks)."""
    removed = 0
    for path in directory.glob(PREFIX + "*"):
        pid = path.name[len(PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by its owner: alive
            path.unlink()
            removed += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


class Arena:
    """A client's shared file and the regions lent out of it (thread-safe: a reply is
    released from the executor that merged it)."""

    def __init__(self, size: int, directory: Path = DIR) -> None:
        if not KEY_BYTES + ALIGN <= size <= MAX_ARENA:
            raise ValueError(f"an arena holds {KEY_BYTES + ALIGN}..{MAX_ARENA} bytes")
        self.key = secrets.token_bytes(KEY_BYTES)
        self.path = directory / f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # "alive" to remove_stale, in any PID namespace
            # Every page now: a page first written into a full /dev/shm would be SIGBUS.
            os.posix_fallocate(fd, 0, size)
            self.map = mmap.mmap(fd, size)
        except BaseException:
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise
        self.fd = fd  # open (and locked) until close()
        self.map[:KEY_BYTES] = self.key
        self.size = size
        self.lock = threading.Lock()
        self.free: list[tuple[int, int]] = [(ALIGN, size - ALIGN)]  # (offset, bytes), sorted
        self.taken: dict[int, int] = {}

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free region of ``nbytes``, or None when none is left."""
        need = _align(max(nbytes, 1))
        with self.lock:
            for i, (at, size) in enumerate(self.free):
                if size >= need:
                    if size == need:
                        del self.free[i]
                    else:
                        self.free[i] = (at + need, size - need)
                    self.taken[at] = need
                    return at
        return None

    def release(self, at: int) -> None:
        with self.lock:
            size = self.taken.pop(at, None)
            if size is None:
                return  # released twice: the second is a no-op
            i = 0
            while i < len(self.free) and self.free[i][0] < at:
                i += 1
            self.free.insert(i, (at, size))
            # Merge with the next, then with the previous neighbour.
            if i + 1 < len(self.free) and at + size == self.free[i + 1][0]:
                self.free[i] = (at, size + self.free.pop(i + 1)[1])
            if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == at:
                prev = self.free.pop(i - 1)
                self.free[i - 1] = (prev[0], prev[1] + self.free[i - 1][1])

    def lend(
        self, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None, out_bytes: int
    ) -> Loan | None:
        """A region holding copies of a lookup's arrays and ``out_bytes`` for its reply, or
        None when the arena has no room. The region is taken until the loan's last view
        (the reply's arrays included) is gone: no view can outlive it."""
        arrays = [ids, lengths] if weights is None else [ids, lengths, weights]
        got = self.reserve([(a.dtype, a.size) for a in arrays], out_bytes)
        if got is None:
            return None
        loan, views = got
        for view, a in zip(views, arrays, strict=True):
            view[:] = a.reshape(-1)
        return loan

    def reserve(
        self, arrays: list[tuple[np.dtype, int]], out_bytes: int
    ) -> tuple[Loan, list[np.ndarray]] | None:
        """``lend`` without the copies: a region with room for arrays of these dtypes and
        sizes (ids, lengths, and weights if given) and ``out_bytes`` for the reply, and the
        arrays, for the caller to fill before the lookup is sent; None when there is no
        room."""
        sizes = [_align(np.dtype(dtype).itemsize * n) for dtype, n in arrays]
        got = self._region(sum(sizes) + _align(out_bytes))
        if got is None:
            return None
        at, base = got
        spec: dict[str, object] = {"path": str(self.path), "key": self.key.hex()}
        views, pos = [], 0
        for name, (dtype, n), size in zip(("ids", "lengths", "weights"), arrays, sizes,
                                          strict=False):  # fmt: skip
            nbytes = np.dtype(dtype).itemsize * n
            views.append(base[pos : pos + nbytes].view(dtype))
            spec[name] = [at + pos, nbytes]
            pos += size
        spec["out"] = [at + pos, out_bytes]
        return Loan(spec, base, at, (at + pos, at + pos + out_bytes), self), views

    def array(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict[str, object]] | None:
        """A float32 array of ``shape`` in the arena for shards to pool into, and the
        ``into`` map naming it (without ``cols``); None when the arena has no room. Taken
        until its last view is gone."""
        got = self._region(4 * shape[0] * shape[1] * shape[2])
        if got is None:
            return None
        at, base = got
        spec: dict[str, object] = {
            "path": str(self.path), "key": self.key.hex(), "at": at, "shape": list(shape)
        }  # fmt: skip
        return base.view(np.float32).reshape(shape), spec

    def _region(self, nbytes: int) -> tuple[int, np.ndarray] | None:
        """A free region's offset and its bytes, taken until their last view is gone; None
        when none is left."""
        at = self.alloc(nbytes)
        if at is None:
            return None
        base = np.frombuffer(self.map, np.uint8, nbytes, at)
        weakref.finalize(base, self.release, at)
        return at, base

    @property
    def lent(self) -> int:
        with self.lock:
            return sum(self.taken.values())

    def close(self) -> None:
        """Unlink the file; the mapping goes when the last view of it does."""
        self.path.unlink(missing_ok=True)
        with self.lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class Loan:
    """One lookup's region of an arena, as the lookup's ``shm`` map names it."""

    def __init__(
        self,
        spec: dict[str, object],
        base: np.ndarray,
        at: int,
        out: tuple[int, int],
        arena: Arena | None = None,
    ) -> None:
        self.spec = spec
        self.base = base  # the region: its last view gone, it is free again
        self.at = at
        self.out = out  # the reply's [start, end) in the arena
        self.arena = arena  # whose region it is

    def floats(self, offset: object, count: int) -> np.ndarray:
        """``count`` float32 of the reply at ``offset``, which must lie in the reply region."""
        if type(offset) is not int or offset % 4:
            raise ValueError(f"offset {offset!r} is not a float32 offset")
        if not self.out[0] <= offset <= offset + 4 * count <= self.out[1]:
            raise ValueError(f"{count} floats at {offset} are outside the reply region")
        start = offset - self.at
        return self.base[start : start + 4 * count].view(np.float32)


class Maps:
    """The arenas a shard has mapped, by path, the most recently used last."""

    def __init__(self, kept: int = MAPS_KEPT, directory: Path = DIR) -> None:
        self.kept = kept
        self.directory = directory
        self.prefix = f"{directory}/"  # of every arena's path (checked without pathlib)
        self.maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def resolve(self, spec: ShmSpec) -> tuple[list[np.ndarray], Region]:
        """Copies of a lookup's arrays (so what is checked is what is pooled) and the
        region its reply goes to."""
        mapped = self.get(spec.path, spec.key)
        size = len(mapped)
        names = ["ids", "lengths", "weights"][: len(spec.arrays)]
        for name, (at, n) in zip([*names, "out"], [*spec.arrays, spec.out], strict=True):
            if at < KEY_BYTES or at + n > size:
                raise BadRequest(
                    f"shm.{name} [{at}, {n}] is outside the arena's {size} bytes",
                    field=f"shm.{name}",
                )
        arrays = [np.frombuffer(mapped, np.uint8, n, at).copy() for at, n in spec.arrays]
        return arrays, Region(mapped, *spec.out)

    def into(self, spec: IntoSpec) -> np.ndarray:
        """The batch array a lookup pools some parts into (``wire.decode_into``'s spec)."""
        mapped = self.get(spec.path, spec.key)
        rows, width, dim = spec.shape
        count = rows * width * dim
        if spec.at < KEY_BYTES or spec.at + 4 * count > len(mapped):
            raise BadRequest(
                f"into [{spec.at}, {4 * count}] is outside the arena's {len(mapped)} bytes",
                field="into",
            )
        return np.frombuffer(mapped, np.float32, count, spec.at).reshape(spec.shape)

    def get(self, path: object, key: object) -> mmap.mmap:
        """The mapping of arena ``path`` if it starts with ``key`` (hex)."""
        if not isinstance(path, str) or not isinstance(key, str):
            raise BadRequest("shm.path and shm.key must be strings", field="shm")
        name = path[len(self.prefix) :]
        if not path.startswith(self.prefix) or "/" in name or not name.startswith(PREFIX):
            raise BadRequest(f"shm.path must name a {self.directory}/{PREFIX}* file", field="shm")
        try:
            want = bytes.fromhex(key)
        except ValueError:
            raise BadRequest("shm.key must be hex", field="shm") from None
        mapped = self.maps.get(path)
        if mapped is None or mapped[:KEY_BYTES] != want:
            mapped = self._open(path, want)
            # A new client: drop the arenas their clients unlinked (a mapping keeps its
            # pages in memory), and the least recently used beyond ``kept``; lookups still
            # writing into one keep it mapped until they are done.
            for gone in [p for p in self.maps if not os.path.exists(p)]:
                del self.maps[gone]
            self.maps[path] = mapped
            while len(self.maps) > self.kept:
                self.maps.popitem(last=False)
        self.maps.move_to_end(path)
        return mapped

    def _open(self, path: str, key: bytes) -> mmap.mmap:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedMemoryUnavailable(f"cannot open {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not KEY_BYTES < st.st_size <= MAX_ARENA:
                raise SharedMemoryUnavailable(f"{path} is not an arena ({st.st_size} bytes)")
            if st.st_uid != os.geteuid() or st.st_blocks * 512 < st.st_size:
                # Another user's file, or one with holes: writing a hole of a full
                # /dev/shm would kill this process with SIGBUS.
                raise SharedMemoryUnavailable(f"{path} is not an arena this shard can use")
            mapped = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        if len(key) != KEY_BYTES or mapped[:KEY_BYTES] != key:
            mapped.close()
            raise SharedMemoryUnavailable(f"{path} does not start with the lookup's key")
        return mapped


class Region:
    """Where one lookup's reply goes: its groups are carved out of it in order."""

    def __init__(self, mapped: mmap.mmap, at: int, nbytes: int) -> None:
        self.mapped = mapped
        self.next = _align(at)
        self.end = at + nbytes
        self.offsets: list[int] = []

    def take(self, shape: tuple[int, int, int]) -> np.ndarray:
        """A float32 array of ``shape`` in the region (the next group's pooled output)."""
        count = shape[0] * shape[1] * shape[2]
        if self.next + 4 * count > self.end:
            raise BadRequest(
                f"shm.out is too small for the reply ({4 * count} more bytes)", field="shm.out"
            )
        out = np.frombuffer(self.mapped, np.float32, count, self.next).reshape(shape)
        self.offsets.append(self.next)
        self.next = _align(self.next + 4 * count)
        return out
