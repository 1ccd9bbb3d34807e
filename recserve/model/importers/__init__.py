"""Importers: turn trained checkpoints into recserve model artifacts.

``dlrm`` reads facebookresearch/dlrm ``DLRM_Net`` state_dicts, ``torchrec`` reads
``torchrec.models.dlrm.DLRM`` state_dicts, ``npz`` reads plain numpy weights. The torch-based
ones need the optional ``torch`` extra and load with ``weights_only=True``.
"""

from recserve.model.importers.common import DenseLayers, build_artifact, infer_interaction
from recserve.model.importers.dlrm import import_dlrm
from recserve.model.importers.npz import import_npz
from recserve.model.importers.torchrec import import_torchrec

__all__ = [
    "DenseLayers",
    "build_artifact",
    "import_dlrm",
    "import_npz",
    "import_torchrec",
    "infer_interaction",
]
