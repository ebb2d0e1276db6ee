"""Sharding rules and distributed algorithms: meshes and logical-axis rules, (Streaming) DiLoCo
with its fragments and low-bit replica exchange (MoE execution strategies land here as well)."""

from parallel.diloco import DilocoConfig as DilocoConfig
from parallel.diloco import DilocoState as DilocoState
from parallel.diloco import diloco_state_shardings as diloco_state_shardings
from parallel.diloco import init_diloco_state as init_diloco_state
from parallel.diloco import make_diloco_step as make_diloco_step
from parallel.diloco import outer_optimizer as outer_optimizer
from parallel.diloco import stack_sharding as stack_sharding
from parallel.exchange import exchange_wire_bytes as exchange_wire_bytes
from parallel.exchange import replica_mean as replica_mean
from parallel.fragments import Fragment as Fragment
from parallel.fragments import make_fragments as make_fragments
from parallel.mesh import make_mesh as make_mesh
from parallel.quantize import dequantize as dequantize
from parallel.quantize import quantize as quantize
from parallel.rules import DEFAULT_RULES as DEFAULT_RULES
from parallel.rules import Rules as Rules
from parallel.rules import activation_constraint as activation_constraint
from parallel.rules import derive_state_shardings as derive_state_shardings
from parallel.rules import indivisible_dims as indivisible_dims
from parallel.rules import logical_sharding as logical_sharding
from parallel.rules import logical_to_spec as logical_to_spec
from parallel.rules import replicate_dims as replicate_dims
from parallel.rules import shard_tree as shard_tree
from parallel.rules import state_param_paths as state_param_paths
from parallel.rules import tree_shardings as tree_shardings
from parallel.rules import with_shardings as with_shardings
