"""MoE execution strategies (expert parallelism, FSDP over experts, FSSDP) and their pieces:
routing, grouped expert compute, token dispatch, sparse collectives, placement, re-sharding."""

from parallel.moe.placement import Placement as Placement
from parallel.moe.placement import plan_placement as plan_placement
from parallel.moe.placement import plan_replication as plan_replication
from parallel.moe.resharding import balanced_order as balanced_order
from parallel.moe.resharding import reorder_index as reorder_index
from parallel.moe.routing import Routing as Routing
from parallel.moe.routing import load_balancing_loss as load_balancing_loss
from parallel.moe.routing import route as route
from parallel.moe.sparse_collectives import replicate_rows as replicate_rows
from parallel.moe.sparse_collectives import replicated_wire_bytes as replicated_wire_bytes
from parallel.moe.sparse_collectives import sparse_all_gather as sparse_all_gather
from parallel.moe.sparse_collectives import sparse_reduce_scatter as sparse_reduce_scatter
from parallel.moe.sparse_collectives import sparse_wire_bytes as sparse_wire_bytes
from parallel.moe.strategy import STRATEGIES as STRATEGIES
from parallel.moe.strategy import MoeLayerState as MoeLayerState
from parallel.moe.strategy import MoeLayerStats as MoeLayerStats
from parallel.moe.strategy import MoeStrategy as MoeStrategy
from parallel.moe.wire_bytes import expert_wire_bytes as expert_wire_bytes
from parallel.moe.wire_bytes import token_wire_bytes as token_wire_bytes
