"""Pure compute kernels: embedding pooling and the DLRM dense forward.

Imports numpy (and numba) only, never another recserve package, so the same code runs in the
gateway, the shard daemon, offline tools and benchmarks.
"""

from kernels.dense import (
    ACTIVATIONS,
    CrossLayer,
    CrossNet,
    DenseNet,
    Interaction,
    Linear,
    sigmoid,
)
from kernels.errors import IdOutOfRangeError, KernelError
from kernels.layout import bag_positions, table_shape
from kernels.pooling import (
    PoolCall,
    PoolMode,
    PoolPlan,
    Table,
    TableSet,
    default_threads,
    pool,
    pool_many,
    pool_packed,
    warm_up,
)
from kernels.quant import Int8RowwiseTable, quantize_rows
from kernels.reference import pool_numpy

__all__ = [
    "ACTIVATIONS",
    "CrossLayer",
    "CrossNet",
    "DenseNet",
    "IdOutOfRangeError",
    "Int8RowwiseTable",
    "Interaction",
    "KernelError",
    "Linear",
    "PoolCall",
    "PoolMode",
    "PoolPlan",
    "Table",
    "TableSet",
    "bag_positions",
    "default_threads",
    "pool",
    "pool_many",
    "pool_numpy",
    "pool_packed",
    "quantize_rows",
    "sigmoid",
    "table_shape",
    "warm_up",
]
