"""Sharding rules and distributed algorithms: meshes and logical-axis rules (MoE execution
strategies and streaming synchronization land here as well)."""

from parallel.mesh import make_mesh as make_mesh
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
