"""The one definition of the store's names: groups, arrays, dimensions, attributes and the step convention.

Step convention (used by every step-indexed array in the store and every result of the engine):
    index ``s`` means "after ``s`` optimizer updates". Parameters and optimizer state exist for ``s = 0..T``
    (``s = 0`` is the initialisation). Per-update records for update ``s`` -- the update that moved
    ``theta_{s-1}`` to ``theta_s`` -- sit at index ``s``; index 0 of per-update arrays is empty (fill values).

Everything else in the project imports these names instead of spelling strings itself.
"""

from __future__ import annotations

FORMAT_NAME = "explaind-store"
FORMAT_VERSION = 1

# --- dimension names -------------------------------------------------------------------------------------------
STEP = "step"  # index s = after s updates
GROUP = "group"  # optimizer parameter group
SLOT = "slot"  # position inside a recorded batch
SAMPLE = "sample"  # training (or split) sample index
MICRO = "micro"  # one training forward (micro-batch) of an update
BYTE = "byte"  # one byte of a generator state
QUERY = "query"  # engine: one query input
OUTPUT = "output"  # engine: one scalar output of a query (e.g. a class log-prob)
TENSOR = "tensor"  # engine: one parameter tensor

# --- groups (one Zarr group per kind of record) ----------------------------------------------------------------
PARAMS = "params"  # one array per recorded (trainable) tensor: (step, *shape)
UPDATES = "updates"  # per-update scalars and batches
DATA = "data"  # data/<split>/{inputs,targets}
STATIC = "static"  # frozen parameters and buffers, stored once (no step axis)

# Optimizer state names exactly as torch spells them in optimizer.state[p]; each is a group like PARAMS.
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
MOMENTUM_BUFFER = "momentum_buffer"
STATE_GROUPS = (EXP_AVG, EXP_AVG_SQ, MOMENTUM_BUFFER)

# --- arrays inside UPDATES ---------------------------------------------------------------------------------------
LR = "lr"  # (step, group) float64: learning rate actually used by update s
WEIGHT_DECAY = "weight_decay"  # (step, group) float64
LOSS = "loss"  # (step,) float64: training loss the user reported for update s (NaN if not given)
BATCH_SIZE = "batch_size"  # (step,) int64: |B_s|
GRAD_SCALE = "grad_scale"  # (step,) float64: gradient-clipping scale applied before update s (1.0 if none)
OPT_STEP = "opt_step"  # (step,) int64: torch's own per-parameter step counter after update s
BATCH = "batch"  # (step, slot) int64: sample indices of B_s, padded with BATCH_PAD
BATCH_PAD = -1
# (step,) bool: True where parameters and optimizer state are stored (a checkpoint); other steps are rebuilt by
# replaying the optimizer from the checkpoint before them (explaind_store.replay). Stores without it store every step.
CHECKPOINT = "checkpoint"
# Runs whose training forward drew random numbers (dropout): per update and training forward (micro-batch, in
# order), the default generator state of the model's device when that forward began, and its number of samples
# (the next micro_size entries of the update's batch; 0: no forward). Created at the first update that drew, so
# stores of deterministic runs lack them; rows before it hold fill values (no record). explaind_store.dropout.
RNG_STATE = "rng_state"  # (step, micro, byte) uint8, fill 0
MICRO_SIZE = "micro_size"  # (step, micro) int64, fill 0
STORED = "stored"  # reader views: boolean coordinate on the step axis, True where the step is stored, not replayed

# --- arrays inside DATA/<split> -----------------------------------------------------------------------------------
INPUTS = "inputs"
TARGETS = "targets"
TRAIN_SPLIT = "train"

# --- root attributes ----------------------------------------------------------------------------------------------
ATTR_FORMAT = "format"
ATTR_FORMAT_VERSION = "format_version"
ATTR_COMMITTED = "committed_updates"  # updates 1..committed are durable; readers never look past it
ATTR_MODEL_SPEC = "model_spec"  # {"factory": "module:callable", "kwargs": {...}}
ATTR_OPTIMIZER = "optimizer"  # {"type": ..., "groups": [{hyperparameters, "tensors": [...]}, ...]}
ATTR_LOSS = "loss"  # {"kind": "cross_entropy" | "nll" | "mse", "reduction": "mean"}
ATTR_TENSORS = "tensors"  # [{"name", "shape", "dtype", "group"}, ...] in model.named_parameters() order
ATTR_STATE_NAMES = "state_names"  # optimizer state groups present, e.g. ["exp_avg", "exp_avg_sq"]
ATTR_CHUNK_UPDATES = "chunk_updates"  # steps per chunk along STEP (the writer's flush interval)
ATTR_CODEC = "codec"
ATTR_DATA = "data"  # {"splits": {name: {"mode": "stored"|"reference", "n": int, "fingerprint": str, ...}}}
ATTR_VERSIONS = "versions"
ATTR_CREATED = "created"
ATTR_SCHEDULER_STATE = "scheduler_state"  # JSON state of an lr scheduler at the committed update (for resume)
ATTR_NONFINITE = "nonfinite_updates"  # updates whose parameters or state held NaN/inf (first few)
# True in stores whose writers write every chunk, even one equal to the fill value: a missing chunk file is then
# always damage. Stores without it (older writers skipped all-fill chunks) are checked more leniently
# (see explaind_store.integrity).
ATTR_EVERY_CHUNK = "every_chunk_written"
# parameters that require grad but received no gradient at the first update (an unused pooler or positional table):
# torch's optimizers skip them, so they never change; stored once under STATIC and left out of ATTR_TENSORS
ATTR_CONSTANTS = "constant_tensors"
ATTR_CHECKPOINT_EVERY = "checkpoint_every"  # K: parameters and optimizer state stored at updates 0, K, 2K, ... and the end
# scheduler state (as ATTR_SCHEDULER_STATE) of the last checkpoint at or before the commit point: a sparse run resumes
# from that checkpoint, not from the committed update
ATTR_CHECKPOINT_SCHEDULER = "checkpoint_scheduler_state"
ATTR_TRAIN_MODE = "train_mode"  # {"training": bool, "differ": [module names]}: the mode the model trained in
# {"device": "cpu" | "cuda", "dtype": "float32", ...}: the generator RNG_STATE holds states of, and the dtype
# training's dropout masks were drawn in (only in stores with RNG_STATE)
ATTR_RNG = "rng"



def tensor_dims(name: str, ndim: int) -> tuple[str, ...]:
    """Dimension names of a tensor's own axes (without the step axis). Unique per tensor so xarray can align."""
    return tuple(f"{name}.d{i}" for i in range(ndim))


def stepped_dims(name: str, ndim: int) -> tuple[str, ...]:
    """Dimension names of a step-indexed tensor array: ``(step, name.d0, ...)``."""
    return (STEP, *tensor_dims(name, ndim))


def data_dims(split: str, array: str, ndim: int) -> tuple[str, ...]:
    """Dimension names of a data array ``(sample, <array>.d1, ...)``."""
    return (SAMPLE, *(f"{array}.d{i}" for i in range(1, ndim)))


def data_path(split: str, array: str | None = None) -> str:
    """Zarr path of a split's group (``data/train``) or array (``data/train/inputs``)."""
    base = f"{DATA}/{split}"
    return base if array is None else f"{base}/{array}"
