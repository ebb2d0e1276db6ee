"""Universal, verifiable checkpoints of any train state, on Orbax.

A checkpoint stores every array whole (logically), keyed by its path in the state, with a JSON
manifest (:mod:`~jaxlib_ext.checkpoint.manifest`): format and library version, the mesh,
process count and (if given) rules it was saved with (information only), the class of every
state node, ``extra`` (JSON: the data pipeline's position, ...) and, for each leaf, its path,
role, dtype, shape, the PartitionSpec it was saved with and a checksum of its logical bytes
(:mod:`~jaxlib_ext.checkpoint.checksums`).

A restore goes through a target (``jax.ShapeDtypeStruct``s with shardings, e.g.
``jax.eval_shape`` of the state's init placed with the library's rules on ANY mesh), so it
reshards onto another mesh, device count or process count, returns exactly the target's
structure and types (optax NamedTuples, PRNG keys), and verifies the checksums. Optimizer state
is matched by parameter address, so a checkpoint restores into an edited optax chain
(:mod:`~jaxlib_ext.checkpoint.restore_plan`), and :mod:`~jaxlib_ext.checkpoint.layouts`
conversions restore it into another layout (scanned <-> per-layer, expert order, replicas,
fused projections).

Orbax does the I/O (atomic commit through a temporary directory, async save); this package adds
the manifest, the checks and typed errors (:mod:`~jaxlib_ext.checkpoint.errors`).

Reliability: a save is committed atomically (a killed save leaves the previous steps intact and
its leftovers are removed by the next save into the directory; opening a directory only to read
it deletes nothing, so an evaluator can read while a trainer writes); an error in a
background save is raised by the next call; a corrupt or truncated step raises
:class:`CorruptCheckpointError` naming the step, the leaf and the data directory, and
``restore(..., fallback=True)`` goes back to the newest good step.

The files: :mod:`~jaxlib_ext.checkpoint.checkpointer` (the :class:`Checkpointer`),
:mod:`~jaxlib_ext.checkpoint.reading` (reading one step into a target),
:mod:`~jaxlib_ext.checkpoint.manifest`, :mod:`~jaxlib_ext.checkpoint.steps` (the directory's
committed steps), :mod:`~jaxlib_ext.checkpoint.restore_plan`,
:mod:`~jaxlib_ext.checkpoint.layouts`, :mod:`~jaxlib_ext.checkpoint.checksums`,
:mod:`~jaxlib_ext.checkpoint.errors`, :mod:`~jaxlib_ext.checkpoint.awaited_reads` (a failed read
waits for its sibling reads, so nothing is printed after the error).
"""

from jaxlib_ext.checkpoint.checkpointer import Checkpointer as Checkpointer
from jaxlib_ext.checkpoint.checksums import checksum_strings as checksum_strings
from jaxlib_ext.checkpoint.errors import CheckpointError as CheckpointError
from jaxlib_ext.checkpoint.errors import CorruptCheckpointError as CorruptCheckpointError
from jaxlib_ext.checkpoint.errors import DirectoryLockedError as DirectoryLockedError
from jaxlib_ext.checkpoint.errors import IncompatibleLayoutError as IncompatibleLayoutError
from jaxlib_ext.checkpoint.errors import MissingStepError as MissingStepError
from jaxlib_ext.checkpoint.errors import SaveError as SaveError
from jaxlib_ext.checkpoint.errors import StepConflictError as StepConflictError
from jaxlib_ext.checkpoint.errors import StructureMismatchError as StructureMismatchError
from jaxlib_ext.checkpoint.layouts import FuseProjection as FuseProjection
from jaxlib_ext.checkpoint.layouts import Layout as Layout
from jaxlib_ext.checkpoint.layouts import PermuteAxis as PermuteAxis
from jaxlib_ext.checkpoint.layouts import SplitProjection as SplitProjection
from jaxlib_ext.checkpoint.layouts import StackLayers as StackLayers
from jaxlib_ext.checkpoint.layouts import StackReplicas as StackReplicas
from jaxlib_ext.checkpoint.layouts import UnstackLayers as UnstackLayers
from jaxlib_ext.checkpoint.layouts import UnstackReplicas as UnstackReplicas
from jaxlib_ext.checkpoint.layouts import flatten as flatten
from jaxlib_ext.checkpoint.manifest import FORMAT as FORMAT
from jaxlib_ext.checkpoint.manifest import manifest as manifest
from jaxlib_ext.checkpoint.restore_plan import RestorePlan as RestorePlan
from jaxlib_ext.checkpoint.restore_plan import leaf_key as leaf_key
from jaxlib_ext.checkpoint.restore_plan import plan_restore as plan_restore

__all__ = [
    "FORMAT",
    "CheckpointError",
    "Checkpointer",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "FuseProjection",
    "IncompatibleLayoutError",
    "Layout",
    "MissingStepError",
    "PermuteAxis",
    "RestorePlan",
    "SaveError",
    "SplitProjection",
    "StackLayers",
    "StackReplicas",
    "StepConflictError",
    "StructureMismatchError",
    "UnstackLayers",
    "UnstackReplicas",
    "checksum_strings",
    "flatten",
    "leaf_key",
    "manifest",
    "plan_restore",
]
