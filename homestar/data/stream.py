"""Deterministic, resumable micro-batches of random windows from a 1-D token array.

Batch k of rank r among w ranks is a pure function of (seed, k*w + r): window starts come from a
`torch.Generator` seeded by a hash of that pair. The cursor is therefore just k, resuming is
exact, and ranks draw from disjoint generator streams. Knows nothing of tokenizers, files or
models; batches are int64 CPU tensors (moving them to a device is the caller's copy).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from homestar.errors import CheckpointError, ConfigError, DataError


def draw_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for draw `index` of a stream seeded with `seed`."""
    digest = hashlib.blake2b(f"homestar-stream:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TokenStream:
    """Deterministic, resumable micro-batches of random windows.

    Batch k (k = 0,1,2,...) of rank r in a world of w ranks is a pure function of
    (seed, k*w + r): windows start at offsets drawn from torch.Generator seeded from that pair,
    so the cursor is just k, resumption is exact, and ranks see disjoint draws.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, micro_batch: int, seed: int,
                 rank: int = 0, world: int = 1, split: str = "training"):
        if seq_len < 1 or micro_batch < 1:
            raise ConfigError(f"seq_len ({seq_len}) and micro_batch ({micro_batch}) must be >= 1")
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in a world of {world}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        need = seq_len + 1
        if len(tokens) < need:
            raise DataError(f"the {split} data has {len(tokens):,} tokens, but one window of "
                            f"seq_len {seq_len} needs {need:,}; add more text or lower --seq-len")
        self.tokens = tokens
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.seed, self.rank, self.world = seed, rank, world
        self.batches = 0
        self._offsets = np.arange(need, dtype=np.int64)

    @property
    def n_windows(self) -> int:
        """How many distinct window starts exist."""
        return len(self.tokens) - self.seq_len

    def batch_at(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch k of this rank, without moving the cursor.

        Cost: one gather of micro_batch*(seq_len+1) tokens (page faults on a cold memmap), one
        widening to int64 and two shifted copies; no torch thread pool.
        """
        gen = torch.Generator().manual_seed(draw_seed(self.seed, k * self.world + self.rank))
        starts = torch.randint(0, self.n_windows, (self.micro_batch,), generator=gen).numpy()
        window = self.tokens[starts[:, None] + self._offsets].astype(np.int64)
        # The shifted copies are made by numpy: torch's strided copy wakes its thread pool, which
        # costs ~10 ms on a busy 2-core machine for a copy that takes 50 us on one thread.
        x, y = np.ascontiguousarray(window[:, :-1]), np.ascontiguousarray(window[:, 1:])
        return torch.from_numpy(x), torch.from_numpy(y)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each [micro_batch, seq_len] int64 on the CPU; y is x shifted by one."""
        batch = self.batch_at(self.batches)
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        """The cursor: {"batches": k, "draws": k*world, "seed", "world", "rank"}."""
        return {"batches": self.batches, "draws": self.batches * self.world,
                "seed": self.seed, "world": self.world, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the saved cursor. With a different world size, continue after the
        global draws already consumed (no draw is repeated; none is skipped by more than w-1)."""
        if int(state["seed"]) != self.seed:
            raise CheckpointError(f"the data cursor was saved with seed {state['seed']}, "
                                  f"but this run uses seed {self.seed}")
        if int(state.get("world", self.world)) == self.world:
            self.batches = int(state["batches"])
        else:
            self.batches = -(-int(state["draws"]) // self.world)  # ceil division
