"""The heterogeneous memory runtime: train a model whose data lives in chunks that move between
device and host memory.

`attach(model, RuntimeConfig(...), OptimConfig(...))` takes over an `nn.Module`'s parameters
from outside and returns a `ChunkedEngine` (the trainer's Engine protocol). `plan_layout` and
`choose_chunk_elems` answer packing questions without allocating. The runtime knows nothing of
GPT, data, the trainer or the UI; CUDA-only code lives in `cuda.py` and is imported lazily.
"""

from homestar.runtime.attach import attach
from homestar.runtime.config import RuntimeConfig
from homestar.runtime.engine import ChunkedEngine
from homestar.runtime.layout import Layout, Slot, choose_chunk_elems, plan_layout
from homestar.runtime.states import StateError

__all__ = [
    "ChunkedEngine",
    "Layout",
    "RuntimeConfig",
    "Slot",
    "StateError",
    "attach",
    "choose_chunk_elems",
    "plan_layout",
]
