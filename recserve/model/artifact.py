"""Reading and writing model artifacts (the directory format of ``recserve.contracts.manifest``).

Tables are streamed to disk chunk by chunk with their sha256 computed on the way, so writing
a model needs memory for one chunk, not for the model. Reading opens tables with mmap and
checks each file's header against the manifest; checksums are verified only on request
(``verify``), since hashing a terabyte takes minutes. Every problem is an ``ArtifactError``
naming the file.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from kernels import CrossLayer, CrossNet, DenseNet, Int8RowwiseTable, Interaction, Linear, Table
from recserve.contracts.errors import ArtifactError, ChecksumMismatch
from recserve.contracts.manifest import (
    DENSE_FILE,
    INT8_TAIL,
    MANIFEST,
    FileEntry,
    InteractionSpec,
    Manifest,
    TableSpec,
)

CHUNK_BYTES = 32 << 20
CROSS_PARTS = ("V", "W", "bias")  # a cross layer's arrays in dense.npz: cross.<l>.V ...


def storage(spec: TableSpec) -> tuple[np.dtype, int]:
    """numpy dtype and row width of a table's ``.npy`` file."""
    if spec.dtype == "int8":
        return np.dtype(np.uint8), spec.dim + INT8_TAIL
    return np.dtype(np.float32 if spec.dtype == "fp32" else np.float16), spec.dim


def chunk_rows(spec: TableSpec) -> int:
    return max(1, CHUNK_BYTES // spec.row_bytes)


class ArtifactWriter:
    """Writes one artifact directory; ``finish`` writes the manifest last, so a directory
    with a manifest is always complete."""

    def __init__(self, out: Path | str, *, overwrite: bool = False) -> None:
        self.out = Path(out)
        if (self.out / MANIFEST).exists() and not overwrite:
            raise ArtifactError(
                "an artifact already exists here (pass overwrite)", path=str(self.out / MANIFEST)
            )
        (self.out / "tables").mkdir(parents=True, exist_ok=True)
        (self.out / MANIFEST).unlink(missing_ok=True)
        self.files: dict[str, FileEntry] = {}

    def _write(self, rel: str, parts: Iterable[bytes | memoryview]) -> None:
        digest = hashlib.sha256()
        size = 0
        tmp = self.out / f"{rel}.partial"
        with open(tmp, "wb") as fh:
            for part in parts:
                digest.update(part)
                fh.write(part)
                size += len(part)
        os.replace(tmp, self.out / rel)
        self.files[rel] = FileEntry(digest.hexdigest(), size)

    def write_table(
        self,
        spec: TableSpec,
        chunks: Iterable[np.ndarray],
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream ``chunks`` (row blocks in storage layout) into ``tables/<name>.npy``."""
        dtype, width = storage(spec)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": (spec.rows, width),
            },
        )

        def parts() -> Iterable[bytes | memoryview]:
            yield header.getvalue()
            written = 0
            for chunk in chunks:
                block = np.ascontiguousarray(chunk, dtype=dtype)
                if block.ndim != 2 or block.shape[1] != width:
                    raise ArtifactError(
                        f"chunk shape {block.shape} != [n, {width}]", path=spec.file
                    )
                written += block.shape[0]
                if written > spec.rows:
                    raise ArtifactError(f"more than {spec.rows} rows given", path=spec.file)
                yield block.data.cast("B")
                if progress:
                    progress(block.shape[0])
            if written != spec.rows:
                raise ArtifactError(f"{written} rows written, {spec.rows} declared", path=spec.file)

        self._write(spec.file, parts())

    def write_table_array(self, spec: TableSpec, values: np.ndarray | Table) -> None:
        data = values.data if isinstance(values, Int8RowwiseTable) else values
        step = chunk_rows(spec)
        self.write_table(spec, (data[i : i + step] for i in range(0, spec.rows, step)))

    def write_dense(self, weights: dict[str, np.ndarray]) -> None:
        self._write(DENSE_FILE, [dense_bytes(weights)])

    def finish(self, manifest: Manifest) -> Manifest:
        final = replace(manifest, files=dict(sorted(self.files.items())))
        expected = {t.file for t in final.tables} | {DENSE_FILE}
        missing = expected - set(self.files)
        if missing:
            raise ArtifactError("was not written", path=sorted(missing)[0])
        tmp = self.out / f"{MANIFEST}.partial"
        tmp.write_bytes(final.to_json())
        os.replace(tmp, self.out / MANIFEST)
        return final


def dense_key(part: str, index: int, what: str) -> str:
    """The ``dense.npz`` name of layer ``index`` of ``part`` (bottom, top): its ``weight``
    ``[out, in]`` or ``bias``."""
    return f"{part}.{index}.{what}"


def dense_weights(
    bottom: Sequence[tuple[np.ndarray, np.ndarray]],
    top: Sequence[tuple[np.ndarray, np.ndarray]],
    cross: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = (),
) -> dict[str, np.ndarray]:
    """``(weight, bias)`` layers of the two MLPs, and ``(V, W, bias)`` of a ``dcn``
    interaction's cross layers, in ``dense.npz``'s naming."""
    out = {}
    for part, layers in (("bottom", bottom), ("top", top)):
        for i, (w, b) in enumerate(layers):
            out[dense_key(part, i, "weight")], out[dense_key(part, i, "bias")] = w, b
    for i, arrays in enumerate(cross):
        for name, array in zip(CROSS_PARTS, arrays, strict=True):
            out[dense_key("cross", i, name)] = array
    return out


# --- reading --------------------------------------------------------------------------------


def open_table(root: Path | str, spec: TableSpec, size: int | None = None) -> Table:
    """Memory-map one table after checking its header against the manifest, and its size
    against ``size`` (the manifest's record of the file) when given: a table is mapped
    shared, so a file truncated under a running daemon would kill it with SIGBUS. An
    artifact directory is immutable once served; a changed one is refused here."""
    path = Path(root) / spec.file
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError as exc:
        raise ArtifactError("missing table file", path=str(path)) from exc
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"not a readable .npy file ({exc})", path=str(path)) from exc
    dtype, width = storage(spec)
    if array.dtype != dtype or array.shape != (spec.rows, width) or not array.flags.c_contiguous:
        raise ArtifactError(
            f"holds {array.dtype} {array.shape}, manifest says {dtype} {(spec.rows, width)}",
            path=str(path),
        )
    if size is not None and path.stat().st_size != size:
        raise ArtifactError(
            f"is {path.stat().st_size} bytes, the manifest says {size}: the artifact was "
            "changed after export (deploy a new directory instead)",
            path=str(path),
        )
    return Int8RowwiseTable(array) if spec.dtype == "int8" else array


def touch(table: Table) -> None:
    """Read one value per page of a memory-mapped table so later lookups do not fault."""
    data = table.data if isinstance(table, Int8RowwiseTable) else table
    if data.shape[0]:
        step = max(1, 4096 // data.strides[0])
        np.add.reduce(data[::step, 0], dtype=np.float64)


HUGE_PAGE = 2 << 20


def hugepage_copies(tables: Sequence[Table]) -> list[Table]:
    """Read-only copies of ``tables`` in one arena of anonymous memory advised for
    transparent huge pages.

    A table served from the page cache sits on 4 KiB pages: every random row costs a TLB miss
    and a page walk, which bounds lookups once the page tables outgrow the CPU caches
    (pooling measured 2.2x faster here on an 8 GiB table, no faster on 2.5 GiB). Here one
    TLB entry covers 2 MiB. The arena is 2 MiB-aligned and ``MADV_HUGEPAGE``, each table in
    it 64-byte aligned (one arena, so small tables do not each take a 2 MiB page); whether
    the kernel backs it with huge pages depends on its THP settings (``huge_page_bytes``
    tells). It costs the tables' size in anonymous memory (the files' pages stay in the page
    cache until reclaimed) and is not shared between processes.
    """
    datas = [t.data if isinstance(t, Int8RowwiseTable) else t for t in tables]
    offsets, size = [], 0
    for data in datas:
        offsets.append(size)
        size += -(-data.nbytes // 64) * 64
    buf = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    base = -np.frombuffer(buf, np.uint8, count=1).ctypes.data % HUGE_PAGE
    out: list[Table] = []
    for table, data, offset in zip(tables, datas, offsets, strict=True):
        copy = np.frombuffer(buf, data.dtype, count=data.size, offset=base + offset)
        copy = copy.reshape(data.shape)
        step = max(1, CHUNK_BYTES // max(1, data.strides[0]))
        for start in range(0, data.shape[0], step):
            copy[start : start + step] = data[start : start + step]
        copy.flags.writeable = False
        out.append(Int8RowwiseTable(copy) if isinstance(table, Int8RowwiseTable) else copy)
    return out


def huge_page_bytes(tables: Iterable[Table]) -> int:
    """Bytes of the mappings holding ``tables`` that the kernel backs with huge pages."""
    starts = {(t.data if isinstance(t, Int8RowwiseTable) else t).ctypes.data for t in tables}
    total, inside = 0, False
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split(" ", 1)[0]
        if not head.endswith(":"):  # a mapping's header, "lo-hi perms offset dev inode path"
            lo, _, hi = head.partition("-")
            inside = any(int(lo, 16) <= a < int(hi, 16) for a in starts)
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) << 10
    return total


def interaction_kernel(
    spec: InteractionSpec,
    weights: Mapping[str, np.ndarray] | None = None,
    width: int = 0,
    path: str = DENSE_FILE,
) -> Interaction | CrossNet:
    """The kernel computing the interaction the manifest describes; a ``dcn`` one takes its
    ``cross.<l>.V|W|bias`` from ``weights``, checked against the spec's rank and ``width``
    (the concatenation's)."""
    if spec.kind != "dcn":
        return Interaction(spec.kind, spec.order, spec.self_interaction)  # type: ignore[arg-type]
    weights = weights or {}
    layers = []
    for i in range(spec.layers):
        v, w, b = (weights.get(dense_key("cross", i, part)) for part in CROSS_PARTS)
        if v is None or w is None or b is None:
            raise ArtifactError(f"lacks cross.{i}.V, .W or .bias", path=path)
        want = ((spec.rank, width), (width, spec.rank), (width,))
        if (v.shape, w.shape, b.shape) != want:
            raise ArtifactError(
                f"cross.{i} has shapes {v.shape}/{w.shape}/{b.shape}, the manifest says "
                f"{want[0]}/{want[1]}/{want[2]}",
                path=path,
            )
        layers.append(CrossLayer(v.astype(np.float32), w.astype(np.float32), b))
    return CrossNet(tuple(layers))


def load_dense(root: Path | str, manifest: Manifest) -> DenseNet:
    path = Path(root) / DENSE_FILE
    return dense_net(manifest, read_dense(path), str(path))


def read_dense(source: Path | bytes, path: str = DENSE_FILE) -> dict[str, np.ndarray]:
    """The arrays of a ``dense.npz`` file or its bytes (``path`` names the bytes)."""
    name = str(source) if isinstance(source, Path) else path
    try:
        with np.load(source if isinstance(source, Path) else io.BytesIO(source)) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError as exc:
        raise ArtifactError("missing dense weights", path=name) from exc
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"not a readable .npz file ({exc})", path=name) from exc


def dense_bytes(weights: Mapping[str, np.ndarray]) -> bytes:
    """``weights`` as ``dense.npz`` holds them."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def dense_net(
    manifest: Manifest, weights: Mapping[str, np.ndarray], path: str = DENSE_FILE
) -> DenseNet:
    """The dense part the manifest describes, from ``dense.npz``'s arrays (checked)."""
    spec = manifest.dense

    def layers(part: str, sizes: tuple[int, ...], acts: tuple[str, ...]) -> tuple[Linear, ...]:
        out = []
        for i, act in enumerate(acts):
            key = f"{part}.{i}"
            w = weights.get(dense_key(part, i, "weight"))
            b = weights.get(dense_key(part, i, "bias"))
            if w is None or b is None:
                raise ArtifactError(f"lacks {key}.weight or {key}.bias", path=path)
            if w.shape != (sizes[i + 1], sizes[i]) or b.shape != (sizes[i + 1],):
                raise ArtifactError(
                    f"{key} has shape {w.shape}/{b.shape}, manifest says "
                    f"{(sizes[i + 1], sizes[i])}",
                    path=path,
                )
            out.append(Linear(w.astype(np.float32), b.astype(np.float32), act))  # type: ignore[arg-type]
        return tuple(out)

    return DenseNet(
        layers("bottom", spec.bottom.sizes, spec.bottom.activations),
        interaction_kernel(spec.interaction, weights, spec.top.sizes[0], path),
        layers("top", spec.top.sizes, spec.top.activations),
    )


def verify(root: Path | str, manifest: Manifest, files: Iterable[str] | None = None) -> None:
    """Check sizes and sha256 of ``files`` (default: all) against the manifest."""
    root = Path(root)
    missing = manifest.expected_files() - set(manifest.files)
    if missing:
        raise ArtifactError("has no checksum in the manifest", path=str(root / min(missing)))
    for rel in sorted(files if files is not None else manifest.files):
        entry = manifest.files.get(rel)
        path = root / rel
        if rel not in manifest.expected_files() or not path.resolve().is_relative_to(
            root.resolve()
        ):
            raise ArtifactError("is not a file of this artifact", path=str(path))
        if entry is None:
            raise ArtifactError("has no checksum in the manifest", path=str(path))
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                while block := fh.read(CHUNK_BYTES):
                    digest.update(block)
        except FileNotFoundError as exc:
            raise ArtifactError("missing", path=str(path)) from exc
        if path.stat().st_size != entry.bytes or digest.hexdigest() != entry.sha256:
            raise ChecksumMismatch(
                "checksum mismatch: the file is damaged or was changed after export", path=str(path)
            )


def file_size(manifest: Manifest, spec: TableSpec) -> int | None:
    """The size the manifest records for a table's file (None while one is being built)."""
    entry = manifest.files.get(spec.file)
    return None if entry is None else entry.bytes
