# numba-compiled bodies: numpy scalar types and intrinsic calls are numba's, not mypy's.
# mypy: disable-error-code="assignment, call-arg"
"""The compiled pooling kernel: many tables, many bags, one call.

``pool_tables_kernel`` is parallel over chunks of ``CHUNK`` consecutive bags of one table,
table-major, so one thread walks consecutive bags and its prefetches run ahead across bag
boundaries. Each chunk is pooled in column passes of up to 128 columns by ``pool_bags``,
whose loops over bags and ids are written directly in LLVM IR so that:

- the accumulators are vector registers (phi nodes), never memory the compiler must assume
  aliases the table rows (numba-level loops over ``out[b, d]`` cost ~200 uops per id);
- the row of the id ``PREFETCH`` positions ahead is prefetched into L1, one ``prefetch`` per
  64-byte line, so many rows are in flight (gathers are bound by memory latency, not
  arithmetic); for a table whose rows are mostly in DRAM (the layout's ``FAR`` column,
  ``layout.mark_far``) the row ``PREFETCH_FAR`` positions ahead is prefetched into L2
  instead (``prefetcht2``). Measured on this project's machine kind: 1.0-1.25x the ids/s of
  the near prefetch into L1 on tables of 0.5-2.5 GB, 0.8-0.95x on tables that stay in
  cache, which keep the near one (most likely more rows in flight than the L1's few
  line-fill buffers allow; not verified with counters);
- fp16 rows are widened with ``fpext`` (vcvtph2ps) and int8 row-wise rows with ``uitofp``
  plus a fused multiply-add by the row's scale, as FBGEMM's fused 8-bit layout needs.

Every (dtype, lanes, vectors) variant is emitted once, fully unrolled, behind one IR
``switch``; the kernel picks the variant per column pass at run time, so one compiled kernel
serves every table of a request whatever its dtype and dim. Rows are addressed from raw base
pointers.

Each bag bound and id is checked in the IR loop before the row is touched (one compare and a
branch never taken on good input, as FBGEMM does); a bad one stops the loop and makes the
kernel return False, and the caller then reports the precise error. Prefetches run ahead
into ids not yet checked: x86 prefetches never fault, so a bad id there costs at most a
wasted fetch.

The IR generator and the kernel share this file on purpose: numba's on-disk cache is
invalidated by the kernel's own source file only, so a change to the IR must touch it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.layout import (
    ADDRESS,
    DIM,
    FAR,
    FIRST_ID,
    KIND,
    MEAN,
    OUT,
    ROW_BYTES,
    ROWS,
    SCALE_OFFSET,
)

PREFETCH = 24  # ids ahead into L1: 16-24 measured best of 8-128 (RAM, cached, memmap tables)
PREFETCH_FAR = 64  # ids ahead into L2 for tables in DRAM: 48-96 measured best (32, 24 less)
LINE = 64
ELEM_BYTES = {"f32": 4, "f16": 2, "i8": 1}

I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
F16, F32 = ir.HalfType(), ir.FloatType()


def _prefetch(builder: ir.IRBuilder, addr: ir.Value, locality: int = 3) -> None:
    """``llvm.prefetch`` for reading: locality 3 is ``prefetcht0`` (into L1), 1 ``prefetcht2``."""
    ptr_ty = I8.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [ptr_ty, I32, I32, I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [builder.inttoptr(addr, ptr_ty), I32(0), I32(locality), I32(1)])


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    vty = a.type
    fnty = ir.FunctionType(vty, [vty, vty, vty])
    name = f"llvm.fma.v{vty.count}f32" if isinstance(vty, ir.VectorType) else "llvm.fma.f32"
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, [a, b, c])


def _splat(builder: ir.IRBuilder, value: ir.Value, lanes: int) -> ir.Value:
    vty = ir.VectorType(value.type, lanes)
    vec = builder.insert_element(ir.Constant(vty, ir.Undefined), value, I32(0))
    return builder.shuffle_vector(
        vec, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(I32, lanes), [0] * lanes)
    )


KINDS = ("f32", "f16", "i8")  # index = the kind code the kernels pass
WIDE, MAX_WIDE = 16, 8  # 16-lane vectors, at most 8 per pass (128 columns)


def variants() -> list[tuple[int, int]]:
    """(lanes, vectors) of every column pass: 16 x 1..8, then 8, 4 and 1 x 1..3."""
    return [(WIDE, n) for n in range(1, MAX_WIDE + 1)] + [(8, 1), (4, 1), (1, 1), (1, 2), (1, 3)]


@njit(inline="always")
def variant_key(kind: int, weighted: bool, lanes: int, nvec: int) -> int:
    """The ``pool_bag`` switch key of one column pass; callable from numba and Python."""
    return (kind * 2 + weighted) * 1024 + lanes * 16 + nvec


def _emit_loop(
    context: Any,
    builder: ir.IRBuilder,
    kind: str,
    weighted: bool,
    W: int,
    NV: int,
    p: dict[str, Any],
    done: ir.Block,
) -> list[tuple[ir.Block, ir.Value]]:
    """The bags loop for one (kind, weighted, lanes, vectors), ending in a branch to ``done``:
    for each bag ``b`` in ``[b0, b1)``, sum rows ``ids[bounds[b]:bounds[b + 1]]`` and store
    the column pass at ``dst0 + (b - b0) * dst_stride``. Returns the (block, ok flag) pairs
    that reach ``done``: bad bounds or an id outside ``[first, first + rows)`` stop the
    loop before any row of that id is touched.

    Unweighted loops add rows with ``fadd``: a multiply by a broadcast 1.0 costs ~20 %.
    ``p["far"]`` (the same for the whole call): prefetch ``PREFETCH_FAR`` ids ahead into L2
    rather than ``PREFETCH`` ahead into L1. LLVM unswitches the loop on it, so each
    prefetch has its own copy of the loop and no branch is left in it.
    """
    esize = ELEM_BYTES[kind]
    vty = ir.VectorType(F32, W)
    zero = ir.Constant(vty, [0.0] * W)
    col_bytes = builder.mul(p["col"], I64(esize))
    entry = builder.basic_block
    fn = builder.function
    name = f"{kind}.{int(weighted)}.{W}x{NV}"
    bag_header = fn.append_basic_block(f"bags.{name}.header")
    bag_body = fn.append_basic_block(f"bags.{name}.body")
    header = fn.append_basic_block(f"bag.{name}.header")
    body = fn.append_basic_block(f"bag.{name}.body")
    exit_ = fn.append_basic_block(f"bag.{name}.exit")
    fail = fn.append_basic_block(f"bag.{name}.fail")
    builder.branch(bag_header)

    builder.position_at_end(bag_header)
    b = builder.phi(I64)
    b.add_incoming(p["b0"], entry)
    dst = builder.phi(I64)
    dst.add_incoming(p["dst0"], entry)
    builder.cbranch(builder.icmp_signed("<", b, p["b1"]), bag_body, done)
    results = [(bag_header, ir.Constant(I1, 1)), (fail, ir.Constant(I1, 0))]

    builder.position_at_end(bag_body)
    start = builder.load(builder.gep(p["bounds"], [b]))
    end = builder.load(builder.gep(p["bounds"], [builder.add(b, I64(1))]))
    bad_bounds = builder.or_(
        builder.or_(builder.icmp_signed("<", start, I64(0)), builder.icmp_signed("<", end, start)),
        builder.icmp_signed(">", end, p["n_ids"]),
    )
    bag_ok = fn.append_basic_block(f"bag.{name}.ok")
    builder.cbranch(bad_bounds, fail, bag_ok)
    builder.position_at_end(bag_ok)
    builder.branch(header)

    builder.position_at_end(header)
    k = builder.phi(I64)
    k.add_incoming(start, bag_ok)
    accs = []
    for _ in range(NV):
        acc = builder.phi(vty)
        acc.add_incoming(zero, bag_ok)
        accs.append(acc)
    builder.cbranch(builder.icmp_signed("<", k, end), body, exit_)

    # Check the id before its row is touched: one unsigned compare (ids below the first
    # wrap to huge values) and a branch that is never taken on good input.
    builder.position_at_end(body)
    the_id = p["load_id"](k)
    bad_id = builder.icmp_unsigned(">=", builder.sub(the_id, p["first"]), p["rows"])
    id_ok = fn.append_basic_block(f"bag.{name}.id_ok")
    builder.cbranch(bad_id, fail, id_ok)
    builder.position_at_end(id_ok)
    # Prefetch the row PREFETCH (or PREFETCH_FAR) ids ahead, or re-touch the current one
    # near the end.
    ahead = builder.add(k, p["distance"])
    k_pf = builder.select(builder.icmp_signed("<", ahead, p["pf_end"]), ahead, k)
    pf_row = builder.add(p["base"], builder.mul(p["load_id"](k_pf), p["row_bytes"]))
    pf_start = builder.add(pf_row, col_bytes)
    span = W * NV * esize
    near_pf = fn.append_basic_block(f"bag.{name}.near")
    far_pf = fn.append_basic_block(f"bag.{name}.far")
    fetched = fn.append_basic_block(f"bag.{name}.fetched")
    # On a flag fixed for the whole call: LLVM unswitches the loop on it (a copy of the loop
    # per prefetch; the kernels take ~1.6x as long to compile). A branch left in the loop
    # cost cached tables 5-8 %.
    builder.cbranch(p["far"], far_pf, near_pf)
    for block, locality in ((near_pf, 3), (far_pf, 1)):
        builder.position_at_end(block)
        for off in range(0, span, LINE):
            _prefetch(builder, builder.add(pf_start, I64(off)), locality)
        # No extra prefetch of a row's last byte (the one more line of rows that are not
        # 64-byte aligned): at a distance of 16 dropping it gained 1-13 % (an instruction per
        # id; the line after a prefetched one is fetched by the hardware anyway).
        if kind == "i8":
            _prefetch(builder, builder.add(pf_row, p["scale_off"]), locality)
        builder.branch(fetched)
    builder.position_at_end(fetched)

    row = builder.add(p["base"], builder.mul(the_id, p["row_bytes"]))
    weight = builder.load(builder.gep(p["weights"], [k])) if weighted else F32(1.0)
    if kind == "i8":
        f32p = F32.as_pointer()
        scale = builder.load(builder.inttoptr(builder.add(row, p["scale_off"]), f32p))
        bias = builder.load(
            builder.inttoptr(builder.add(row, builder.add(p["scale_off"], I64(4))), f32p)
        )
        mult = _splat(builder, builder.fmul(scale, weight) if weighted else scale, W)
        shift = _splat(builder, builder.fmul(bias, weight) if weighted else bias, W)
    elif weighted:
        mult = _splat(builder, weight, W)
    src = builder.add(row, col_bytes)
    new_accs = []
    for j, acc in enumerate(accs):
        addr = builder.add(src, I64(j * W * esize))
        if kind == "f32":
            vals = builder.load(builder.inttoptr(addr, vty.as_pointer()), align=1)
        elif kind == "f16":
            hty = ir.VectorType(F16, W)
            vals = builder.fpext(
                builder.load(builder.inttoptr(addr, hty.as_pointer()), align=1), vty
            )
        else:
            bty = ir.VectorType(I8, W)
            vals = builder.uitofp(
                builder.load(builder.inttoptr(addr, bty.as_pointer()), align=1), vty
            )
        if kind == "i8":
            nxt = builder.fadd(_fma(builder, vals, mult, acc), shift)
        elif weighted:
            nxt = _fma(builder, vals, mult, acc)
        else:
            nxt = builder.fadd(acc, vals)
        new_accs.append(nxt)
    tail = builder.basic_block
    k.add_incoming(builder.add(k, I64(1)), tail)
    for acc, nxt in zip(accs, new_accs, strict=True):
        acc.add_incoming(nxt, tail)
    builder.branch(header)

    builder.position_at_end(exit_)
    for j, acc in enumerate(accs):
        addr = builder.add(dst, I64(j * W * 4))
        builder.store(acc, builder.inttoptr(addr, vty.as_pointer()), align=1)
    b.add_incoming(builder.add(b, I64(1)), exit_)
    dst.add_incoming(builder.add(dst, p["dst_stride"]), exit_)
    builder.branch(bag_header)

    builder.position_at_end(fail)
    builder.branch(done)
    return results


# Addresses travel as intp: numba types uint64 + int64 as float64.
_I = types.intp


@intrinsic
def pool_bags(typingctx, key, far, base, ids, bounds, b0, b1, pf_end, first, rows, row_bytes,
              col, scale_off, weights, dst0, dst_stride):  # fmt: skip
    """Pool bags ``[b0, b1)`` of one table over one column pass: bag ``b`` sums rows
    ``ids[bounds[b]:bounds[b + 1]]`` of the table at address ``base`` into the float32 row
    at address ``dst0 + (b - b0) * dst_stride``. ``bounds`` is the address of the table's
    int64 bag bounds. ``key`` (``variant_key``) picks kind, weighting, lanes and vectors;
    an unknown key does nothing. ``far`` (1 or 0): prefetch for a table in DRAM. Returns
    False, at the first bad bag bound (outside ``[0, len(ids)]`` or decreasing) or id
    (outside ``[first, first + rows)``), before touching that id's row."""
    sig = types.boolean(_I, _I, _I, ids, _I, _I, _I, _I, _I, _I, _I, _I, _I, weights, _I, _I)

    def codegen(context, builder, signature, args):
        (key_v, far_v, base_v, ids_v, bounds_v, b0_v, b1_v, pf_end_v, first_v, rows_v, rb_v,
         col_v, so_v, w_v, dst0_v, stride_v) = args  # fmt: skip
        ids_arr = context.make_array(signature.args[3])(context, builder, ids_v)
        w_arr = context.make_array(signature.args[13])(context, builder, w_v)
        n_ids = cgutils.unpack_tuple(builder, ids_arr.shape, 1)[0]
        narrow = signature.args[3].dtype.bitwidth < 64
        far = builder.icmp_signed("!=", far_v, I64(0))

        def load_id(k: ir.Value) -> ir.Value:
            raw = builder.load(builder.gep(ids_arr.data, [k]))
            return builder.sext(raw, I64) if narrow else raw

        params = dict(base=base_v, bounds=builder.inttoptr(bounds_v, I64.as_pointer()),
                      b0=b0_v, b1=b1_v, pf_end=pf_end_v, first=first_v, rows=rows_v,
                      n_ids=n_ids, row_bytes=rb_v, col=col_v, scale_off=so_v,
                      weights=w_arr.data, dst0=dst0_v, dst_stride=stride_v,
                      load_id=load_id, far=far,
                      distance=builder.select(far, I64(PREFETCH_FAR), I64(PREFETCH)))  # fmt: skip
        fn = builder.function
        done = fn.append_basic_block("bags.done")
        results = [(builder.basic_block, ir.Constant(I1, 1))]  # an unknown key: nothing
        switch = builder.switch(key_v, done)
        for kind_code, kind in enumerate(KINDS):
            for weighted in (False, True):
                for lanes, nvec in variants():
                    case = fn.append_basic_block(f"bags.{kind}.{int(weighted)}.{lanes}x{nvec}")
                    key = variant_key.py_func(kind_code, weighted, lanes, nvec)
                    switch.add_case(I64(key), case)
                    builder.position_at_end(case)
                    results += _emit_loop(
                        context, builder, kind, weighted, lanes, nvec, params, done
                    )
        builder.position_at_end(done)
        ok = builder.phi(I1)
        for block, value in results:
            ok.add_incoming(value, block)
        return ok  # numba's boolean is an i1 in registers

    return sig, codegen


@njit(nogil=True, cache=True)
def address(data):  # pragma: no cover - compiled
    """The address of ``data``'s first element."""
    return data.ctypes.data


CHUNK = 32  # bags per parallel work item: balance for 2 threads at B=256, one dispatch each


@njit(inline="always")
def pool_chunk(layout, ids, bounds, weights, weighted, out, g, n_chunks):  # pragma: no cover
    """Pool work item ``g``: bags ``[b0, b0 + CHUNK)`` of table ``g // n_chunks`` into
    column ``layout[t, OUT]`` of ``out``, every column pass, then the mean. False when a
    bound or id was bad (the IR loop stopped)."""
    width = out.shape[1]
    n_bags = bounds.shape[1] - 1
    dim = out.shape[2]
    t = g // n_chunks
    at = layout[t, OUT]
    b0 = (g - t * n_chunks) * CHUNK
    b1 = min(b0 + CHUNK, n_bags)
    pf_end = min(max(bounds[t, n_bags], bounds[t, b1]), ids.shape[0])  # id reads stay in range
    t_bounds = np.intp(bounds.ctypes.data) + t * (n_bags + 1) * 8
    dst0 = np.intp(out.ctypes.data) + (b0 * width + at) * dim * 4
    col = 0
    while col < dim:
        rem = dim - col
        if rem >= WIDE:
            lanes = WIDE
            nvec = min(rem // WIDE, MAX_WIDE)
        elif rem >= 8:
            lanes, nvec = 8, 1
        elif rem >= 4:
            lanes, nvec = 4, 1
        else:
            lanes, nvec = 1, rem
        key = variant_key(layout[t, KIND], weighted, lanes, nvec)
        if not pool_bags(key, layout[t, FAR], layout[t, ADDRESS], ids, t_bounds, b0, b1, pf_end,
                         layout[t, FIRST_ID], layout[t, ROWS], layout[t, ROW_BYTES], col,
                         layout[t, SCALE_OFFSET], weights, dst0 + col * 4,
                         width * dim * 4):  # fmt: skip
            return False
        col += lanes * nvec
    if layout[t, MEAN]:
        for b in range(b0, b1):
            n = bounds[t, b + 1] - bounds[t, b]
            if n > 0:
                inv = np.float32(1.0) / np.float32(n)
                for d in range(dim):
                    out[b, at, d] *= inv
    return True


@njit(parallel=True, nogil=True, cache=True)
def pool_tables_kernel(layout, ids, bounds, weights, weighted, out):  # pragma: no cover
    """``layout[t]``: table ``t``'s columns (``kernels.layout``). Its ids are in
    ``[FIRST_ID, FIRST_ID + ROWS)``; ``ADDRESS`` is that of the row id 0 would have, so the IR
    loop addresses rows by id with no subtraction.

    Work items are chunks of ``CHUNK`` bags of one table, table-major. Bounds and ids are
    checked in the IR loop as they are read, before the row is touched (a serial pre-pass
    over all ids cost a third of the time with cached rows, a vectorised pass per chunk
    ~10 %). Returns False when any bag was bad; other bags may have been pooled.
    """
    n_chunks = (bounds.shape[1] - 1 + CHUNK - 1) // CHUNK
    failed = np.zeros(1, np.bool_)
    for g in prange(layout.shape[0] * n_chunks):
        if not pool_chunk(layout, ids, bounds, weights, weighted, out, g, n_chunks):
            failed[0] = True
    return not failed[0]


@njit(nogil=True, cache=True)
def pool_tables_serial(layout, ids, bounds, weights, weighted, out):  # pragma: no cover
    """``pool_tables_kernel`` on the calling thread alone, with no OpenMP region: for small
    calls, and for callers that run several kernels at once from their own threads (a
    parallel region per call would make them queue for the one OpenMP team)."""
    n_chunks = (bounds.shape[1] - 1 + CHUNK - 1) // CHUNK
    for g in range(layout.shape[0] * n_chunks):
        if not pool_chunk(layout, ids, bounds, weights, weighted, out, g, n_chunks):
            return False
    return True


@njit(nogil=True, cache=True)
def one_table(table, offsets, last, n_ids, mean, far_bytes, layout, bounds):  # pragma: no cover
    """``kernels.pool``'s common case, a float32 table of at least one row and column: its
    layout row into ``layout`` (``[1, COLUMNS]``, zeros) and the bag bounds from ``offsets``
    (``last``: they end with ``n_ids``) into ``bounds`` (``[1, B + 1]``), in one call
    (~4 us of Python otherwise). False when the offsets are bad (not delimiting
    ``B`` bags from position 0; the kernel checks the rest): the caller's checked path
    then names what is wrong."""
    n_bags = bounds.shape[1] - 1
    if last:
        if offsets.shape[0] != n_bags + 1 or offsets[n_bags] != n_ids:
            return False
        for i in range(n_bags + 1):
            bounds[0, i] = offsets[i]
    else:
        if offsets.shape[0] != n_bags:
            return False
        for i in range(n_bags):
            bounds[0, i] = offsets[i]
        bounds[0, n_bags] = n_ids
    if bounds[0, 0] != 0:
        return False
    layout[0, ADDRESS] = table.ctypes.data
    layout[0, ROW_BYTES] = table.strides[0]
    layout[0, ROWS] = table.shape[0]
    layout[0, MEAN] = mean
    layout[0, DIM] = table.shape[1]
    layout[0, FAR] = table.shape[0] * table.strides[0] >= far_bytes
    return True
