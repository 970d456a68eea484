"""The run configuration: everything needed to rebuild a run, stored as RUN_DIR/config.json.

Built once from the command line and the preset when a run starts; read back unchanged on resume
(only `steps` may grow). Validation raises ConfigError with a one-line message.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from homestar.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
RUNTIMES = ("chunked", "torch")
DEVICES = ("auto", "cuda", "cpu")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str
    preset: str
    model: dict
    """GPTConfig fields (vocab_size, seq_len, d_model, n_layer, n_head, tie_embeddings)."""
    params: int
    data: dict
    """{"source": what the user gave, "kind", "description", "fingerprint"}."""
    tokenizer_hash: str
    steps: int
    """Total optimizer steps this run trains to (resume --steps may raise it)."""
    micro_batch: int
    accum: int
    data_micro_batch: int | None = None
    """Sequences per draw from the token stream, fixed when the run starts (None: micro_batch).
    An out-of-memory recovery splits micro-batches but keeps drawing these, so the data order
    and the maths of every step stay those of the run's start."""
    world: int = 1
    """Ranks the run started on. micro_batch and data_micro_batch are per rank at that size, so a
    draw of the global batch is draw_batch * world sequences whatever number of ranks resumes it."""
    seed: int
    save_every: int
    """Checkpoint every N steps (0: only when the run stops)."""
    eval_every: int
    eval_batches: int
    sample_every: int
    device: str
    """Resolved compute device: "cuda" or "cpu"."""
    precision: str
    """Resolved precision: "bf16", "fp16" or "fp32"."""
    runtime: str
    gpu_mem_gib: float | None = None
    cpu_mem_gib: float | None = None
    """Cap on the whole training process's host memory, pinned included (--cpu-mem-gib)."""
    host_chunk_gib: float | None = None
    """The chunk runtime's own host budget when the planner chose one (--preset auto)."""
    chunk_elems: int | None = None
    activation_checkpointing: bool = False
    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    """The cosine horizon: a property of the run, independent of how far one invocation trains."""
    weight_decay: float
    grad_clip: float
    beta1: float
    beta2: float
    keep_checkpoints: int = 2
    init_from: str | None = None
    """The Hugging Face GPT-2 folder whose weights started the run (absolute path), or None for a
    randomly initialised one. Read again only by a resume that finds no checkpoint yet."""
    created: float = field(default_factory=time.time)
    format: int = 1

    def __post_init__(self) -> None:
        positive = ("steps", "micro_batch", "accum", "eval_batches", "decay_steps", "keep_checkpoints", "world")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive whole number, got {getattr(self, name)!r}")
        if self.data_micro_batch is not None and (not isinstance(self.data_micro_batch, int) or self.data_micro_batch < 1
                                                  or self.data_micro_batch % self.micro_batch):
            raise ConfigError(f"data-micro-batch must be a whole multiple of micro-batch ({self.micro_batch}), "
                              f"got {self.data_micro_batch!r}")
        for name in ("save_every", "eval_every", "sample_every", "warmup_steps", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must be zero or a positive whole number")
        for name in ("gpu_mem_gib", "cpu_mem_gib", "host_chunk_gib"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of GiB, got {value}")
        if self.precision not in PRECISIONS[1:]:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}")
        if self.device not in DEVICES[1:]:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}")
        if self.device == "cpu" and self.precision == "fp16":
            raise ConfigError("fp16 needs a GPU; use --precision fp32 or bf16 on the CPU")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError("learning rates must satisfy 0 <= min_lr <= lr and lr > 0")

    @property
    def seq_len(self) -> int:
        return int(self.model["seq_len"])

    @property
    def draw_batch(self) -> int:
        """Sequences per token-stream draw (see data_micro_batch)."""
        return self.data_micro_batch or self.micro_batch

    @property
    def draws_per_step(self) -> int:
        """Token-stream draws one optimizer step trains on (an out-of-memory split keeps it)."""
        return self.micro_batch * self.accum // self.draw_batch

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks."""
        return self.micro_batch * self.accum * self.world * self.seq_len

    @property
    def global_draw(self) -> int:
        """Sequences of one draw of the global batch (shared among the ranks)."""
        return self.draw_batch * self.world

    def save(self, run_dir: Path) -> None:
        """Write config.json atomically."""
        tmp = run_dir / "config.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / "config.json")

    @classmethod
    def load(cls, run_dir: Path) -> RunConfig:
        path = run_dir / "config.json"
        if not path.is_file():
            raise ConfigError(f"{run_dir} is not a homestar run (no config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("not an object")
            known = {f.name for f in fields(cls)}
            config = cls(**{k: v for k, v in raw.items() if k in known})
        except ConfigError as exc:
            raise ConfigError(f"{path} is invalid: {exc}") from None
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is damaged or not a homestar config ({type(exc).__name__})") from None
        if not isinstance(config.model, dict) or not isinstance(config.data, dict):
            raise ConfigError(f"{path} is damaged: model and data must be objects")
        return config
