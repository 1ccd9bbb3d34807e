"""The model manifest: the one description of a model artifact (``manifest.json``).

An artifact is a directory holding ``manifest.json``, one ``tables/<name>.npy`` per embedding
table (row-major, opened with mmap) and ``dense.npz`` with the MLP weights in torch layout
(``bottom.<i>.weight`` ``[out, in]``, ``bottom.<i>.bias``, ``top.<i>.*``). The manifest's
feature order is the order the interaction consumes pooled vectors: tables in order, each
table's features in order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from recserve.contracts.errors import ArtifactError, UnsupportedFormat
from recserve.contracts.schema import Doc

FORMAT = "recserve-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.npz"
DTYPES = ("fp32", "fp16", "int8")
POOLINGS = ("sum", "mean")
INTERACTIONS = ("dot", "cat", "dcn")
ORDERS = ("dlrm_tril", "torchrec_triu")
ACTIVATIONS = ("relu", "sigmoid", "none")  # kernels.dense applies them; a test checks both agree
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # fullmatch: no trailing newline
INT8_TAIL = 8  # float32 scale + bias per row, FBGEMM's fused layout


def row_bytes(dtype: str, dim: int) -> int:
    return {"fp32": 4 * dim, "fp16": 2 * dim, "int8": dim + INT8_TAIL}[dtype]


@dataclass(frozen=True)
class AccessStats:
    """How a table is read: Zipf exponent of id popularity, mean ids per bag, and for
    multi-hot features of fixed size (MLPerf DLRM-v2's) that size."""

    zipf: float | None = None
    pooling_factor: float | None = None
    bag_size: int | None = None

    def to_dict(self) -> dict[str, float]:
        pairs = (
            ("zipf", self.zipf),
            ("pooling_factor", self.pooling_factor),
            ("bag_size", self.bag_size),
        )
        return {k: v for k, v in pairs if v is not None}


@dataclass(frozen=True)
class TableSpec:
    name: str
    rows: int
    dim: int
    dtype: str = "fp32"
    pooling: str = "sum"
    features: tuple[str, ...] = ()
    net: str = "default"
    stats: AccessStats = field(default_factory=AccessStats)

    @property
    def file(self) -> str:
        return f"tables/{self.name}.npy"

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.dtype, self.dim)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "pooling": self.pooling,
            "features": list(self.features),
            "net": self.net,
        }
        if self.stats.to_dict():
            out["stats"] = self.stats.to_dict()
        return out


@dataclass(frozen=True)
class MLPSpec:
    sizes: tuple[int, ...]
    activations: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "activations": list(self.activations)}


@dataclass(frozen=True)
class InteractionSpec:
    """``dot`` (pairwise dots, in ``order``), ``cat`` (concatenation) or ``dcn`` (DCNv2's
    low-rank cross network over the concatenation: ``layers`` layers of rank ``rank``, their
    weights in ``dense.npz`` as ``cross.<l>.V|W|bias``)."""

    kind: str = "dot"
    order: str = "dlrm_tril"
    self_interaction: bool = False
    layers: int = 0  # dcn only
    rank: int = 0  # dcn only

    def output_width(self, dim: int, n_features: int) -> int:
        """Width of the interaction's output for ``n_features`` pooled vectors of ``dim``
        plus the bottom MLP's output (``kernels.Interaction`` computes the same; a test
        holds them equal)."""
        n = n_features + 1
        if self.kind in ("cat", "dcn"):
            return dim * n
        pairs = n * (n + 1) // 2 if self.self_interaction else n * (n - 1) // 2
        return dim + pairs

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "order": self.order,
            "self_interaction": self.self_interaction,
        }
        if self.kind == "dcn":  # only then: other models keep their digests
            out.update(layers=self.layers, rank=self.rank)
        return out


@dataclass(frozen=True)
class DenseSpec:
    bottom: MLPSpec
    interaction: InteractionSpec
    top: MLPSpec

    def to_dict(self) -> dict[str, Any]:
        return {
            "bottom": self.bottom.to_dict(),
            "interaction": self.interaction.to_dict(),
            "top": self.top.to_dict(),
            "file": DENSE_FILE,
        }


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    dense_width: int
    tables: tuple[TableSpec, ...]
    dense: DenseSpec
    files: Mapping[str, FileEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    # -- queries --------------------------------------------------------------------------

    def features(self) -> Iterator[tuple[str, TableSpec]]:
        """(feature, table) pairs in interaction order."""
        for table in self.tables:
            for feature in table.features:
                yield feature, table

    def table(self, name: str) -> TableSpec:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)

    @property
    def embedding_dim(self) -> int:
        return self.dense.bottom.sizes[-1]

    @property
    def table_bytes(self) -> int:
        return sum(t.nbytes for t in self.tables)

    def digest(self) -> str:
        """sha256 of the canonical manifest, file checksums included: the model's identity."""
        return hashlib.sha256(orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)).hexdigest()

    # -- (de)serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "dense_width": self.dense_width,
            "tables": [t.to_dict() for t in self.tables],
            "dense": self.dense.to_dict(),
            "files": {k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in self.files.items()},
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2)

    def check(self) -> None:
        """Cross-field rules: names, widths of the MLPs, interaction width."""
        path = MANIFEST

        def bad(msg: str, fld: str) -> ArtifactError:
            return ArtifactError(f"{fld}: {msg}", path=path, field=fld)

        if not self.tables:
            raise bad("a model needs at least one table", "tables")
        names: set[str] = set()
        feats: set[str] = set()
        for i, t in enumerate(self.tables):
            where = f"tables[{i}]"
            if not NAME_RE.fullmatch(t.name) or t.name in names:
                raise bad(f"table name {t.name!r} is invalid or repeated", f"{where}.name")
            names.add(t.name)
            if t.rows < 1 or t.dim < 1:
                raise bad("rows and dim must be positive", where)
            if t.dtype not in DTYPES or t.pooling not in POOLINGS:
                raise bad(f"dtype {t.dtype!r} / pooling {t.pooling!r} unsupported", where)
            if not t.features:
                raise bad("a table needs at least one feature", f"{where}.features")
            for f in t.features:
                if not f or f in feats:
                    raise bad(f"feature name {f!r} is empty or repeated", f"{where}.features")
                feats.add(f)
        for part, mlp in (("bottom", self.dense.bottom), ("top", self.dense.top)):
            fld = f"dense.{part}"
            if len(mlp.sizes) < 2 or any(s < 1 for s in mlp.sizes):
                raise bad("sizes need at least input and output widths, all positive", fld)
            if len(mlp.activations) != len(mlp.sizes) - 1:
                raise bad("needs one activation per layer", f"{fld}.activations")
            if any(a not in ACTIVATIONS for a in mlp.activations):
                raise bad(f"activations must be among {ACTIVATIONS}", f"{fld}.activations")
        if self.dense.bottom.sizes[0] != self.dense_width:
            raise bad(
                f"bottom MLP input {self.dense.bottom.sizes[0]} != dense_width {self.dense_width}",
                "dense.bottom.sizes",
            )
        dim = self.embedding_dim
        for i, t in enumerate(self.tables):
            if t.dim != dim:
                raise bad(f"dim {t.dim} != bottom MLP output {dim}", f"tables[{i}].dim")
        inter = self.dense.interaction
        if inter.kind not in INTERACTIONS or inter.order not in ORDERS:
            raise bad("unknown interaction kind or order", "dense.interaction")
        if inter.order == "torchrec_triu" and inter.self_interaction:
            raise bad("torchrec_triu has no self-interaction", "dense.interaction")
        if (inter.kind == "dcn") != (inter.layers > 0 and inter.rank > 0):
            raise bad("layers and rank (both >= 1) belong to dcn only", "dense.interaction")
        width = inter.output_width(dim, len(feats))
        if self.dense.top.sizes[0] != width:
            raise bad(
                f"top MLP input {self.dense.top.sizes[0]} != interaction output {width}",
                "dense.top.sizes",
            )
        if self.dense.top.sizes[-1] != 1:
            raise bad("top MLP must end in one output", "dense.top.sizes")
        if self.files and set(self.files) != self.expected_files():
            odd = sorted(set(self.files) ^ self.expected_files())[0]
            raise bad(
                f"lists {odd!r}: files must be exactly the tables' files and {DENSE_FILE}",
                "files",
            )

    def expected_files(self) -> set[str]:
        """The artifact's files, relative to its directory: nothing else is ever read."""
        return {t.file for t in self.tables} | {DENSE_FILE}


def parse_manifest(raw: bytes, path: str = MANIFEST) -> Manifest:
    """Parse and validate manifest bytes; every problem is an ``ArtifactError`` naming ``path``."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ArtifactError(f"not valid JSON ({exc})", path=path) from exc

    def error(msg: str, fld: str) -> ArtifactError:
        return ArtifactError(msg, path=path, field=fld)

    doc = Doc(value, "", error)
    if doc.get("format", str, None) != FORMAT:
        raise UnsupportedFormat(f"not a {FORMAT} manifest", path=path)
    version = doc.get("format_version", int)
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"format_version {version} is not supported (this recserve reads {FORMAT_VERSION});"
            " upgrade recserve or re-export the model",
            path=path,
        )
    doc.only(
        "format", "format_version", "name", "version", "dense_width", "tables", "dense", "files"
    )
    tables = []
    for t in doc.subs("tables"):
        t.only("name", "rows", "dim", "dtype", "pooling", "features", "net", "stats")
        stats = AccessStats()
        if "stats" in t.value:
            s = t.sub("stats")
            s.only("zipf", "pooling_factor", "bag_size")
            stats = AccessStats(
                s.get("zipf", float, None),
                s.get("pooling_factor", float, None),
                s.int("bag_size", None, minimum=0),
            )
        feats = t.items("features")
        if not all(isinstance(f, str) for f in feats):
            raise t.fail("features", "must be a list of strings")
        tables.append(
            TableSpec(
                name=t.get("name", str),
                rows=t.int("rows", minimum=1),
                dim=t.int("dim", minimum=1),
                dtype=t.choice("dtype", DTYPES),
                pooling=t.choice("pooling", POOLINGS),
                features=tuple(feats),
                net=t.get("net", str, "default"),
                stats=stats,
            )
        )
    d = doc.sub("dense")
    d.only("bottom", "interaction", "top", "file")
    if d.get("file", str, DENSE_FILE) != DENSE_FILE:
        raise d.fail("file", f"must be {DENSE_FILE}")

    def mlp(key: str) -> MLPSpec:
        m = d.sub(key)
        m.only("sizes", "activations")
        sizes, acts = m.items("sizes"), m.items("activations")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            raise m.fail("sizes", "must be a list of integers")
        if not all(isinstance(a, str) for a in acts):
            raise m.fail("activations", "must be a list of strings")
        return MLPSpec(tuple(sizes), tuple(acts))

    i = d.sub("interaction")
    i.only("kind", "order", "self_interaction", "layers", "rank")
    inter = InteractionSpec(
        i.choice("kind", INTERACTIONS),
        i.choice("order", ORDERS, "dlrm_tril"),
        i.get("self_interaction", bool, False),
        i.int("layers", 0, minimum=0),
        i.int("rank", 0, minimum=0),
    )
    files = {}
    for name, entry in doc.get("files", Mapping, {}).items():
        e = Doc(entry, f"files.{name}", error)
        e.only("sha256", "bytes")
        files[name] = FileEntry(e.get("sha256", str), e.int("bytes", minimum=0))
    return Manifest(
        name=doc.get("name", str),
        version=str(doc.get("version", (str, int))),
        dense_width=doc.int("dense_width", minimum=1),
        tables=tuple(tables),
        dense=DenseSpec(mlp("bottom"), inter, mlp("top")),
        files=files,
    )


def read_manifest(root: Path | str) -> Manifest:
    path = Path(root) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError("missing: not a model artifact directory", path=str(path)) from exc
    except OSError as exc:
        raise ArtifactError(f"cannot read ({exc.strerror})", path=str(path)) from exc
    return parse_manifest(raw, str(path))
