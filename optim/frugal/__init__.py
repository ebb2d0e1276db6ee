"""FRUGAL: full-rank updates with gradient splitting (state-full Adam subspace, state-free rest).

``optimizer.py`` is the optimizer, ``transform.py`` the direction that composes the block mode
(``blocks.py``) and the matrix modes (``projections.py``) with the two update rules
(``rules.py``).
"""

from optim.frugal.blocks import BLOCK_ORDERS as BLOCK_ORDERS
from optim.frugal.optimizer import frugal as frugal
from optim.frugal.projections import keyed_indices as keyed_indices
from optim.frugal.rules import FREE_RULES as FREE_RULES
from optim.frugal.transform import PROJECTIONS as PROJECTIONS
from optim.frugal.transform import FrugalState as FrugalState
from optim.frugal.transform import default_projectable as default_projectable
from optim.frugal.transform import frugal_projections as frugal_projections
from optim.frugal.transform import scale_by_frugal as scale_by_frugal
