"""Which host-homed chunk groups' AdamW streams through the device, and how that split moves.

A fixed split takes the configured share of the host-homed elements. An automatic one starts at
half and, after each of the first `AUTO_SHARE_STEPS` steps, moves half way toward the share that
makes both engines finish together (their measured elements per second, each engine timed over
its own work while the update runs as training runs it: beside the next forward on one process,
in the step across ranks); then it stays, so a run's later steps split alike, and its state
travels in checkpoints so a resumed run splits as the uninterrupted one would have (the CPU's and
the GPU's AdamW kernels may round differently in the last bit). Knows nothing of chunks'
contents, placement or the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO_SHARE_STEPS = 8
"""Steps over which an automatic split follows the measured rates."""
_BOUNDS = (0.05, 0.95)
"""An automatic split never gives either engine everything: both keep being measured."""


@dataclass(slots=True)
class AdamSplit:
    share: float = 0.0
    """Fraction of the host-homed groups' elements whose AdamW streams through the device; 0:
    every host-homed group on the CPU."""
    auto: bool = False
    """Follow the measured rates (see the module docstring)."""
    steps: int = 0
    """Steps the automatic split has followed the rates so far."""

    @classmethod
    def configured(cls, share: float | None, *, on_gpu: bool) -> "AdamSplit":
        """`share` None: automatic on a GPU (starting at half), no streaming elsewhere."""
        if share is not None:
            return cls(share=share)
        return cls(share=0.5, auto=True) if on_gpu else cls()

    @property
    def active(self) -> bool:
        return self.share > 0 or self.auto

    def streamed(self, sizes: list[int]) -> int:
        """How many of the host-homed groups (elements each, in the order they stream) stream:
        the first ones, up to the share (a group counts when at least half of it fits). An
        automatic split leaves each engine a group at least, where there are two: rounding to
        whole groups would otherwise give one engine everything (a share of 0.9 over four groups)
        and its rate would no longer be measured."""
        goal, taken, count = self.share * sum(sizes), 0, len(sizes)
        for index, size in enumerate(sizes):
            if taken + size / 2 > goal:
                count = index
                break
            taken += size
        if self.auto and len(sizes) >= 2:
            count = min(max(count, 1), len(sizes) - 1)
        return count

    def follow(self, cpu_elems: int, cpu_s: float, dev_elems: int, dev_s: float) -> None:
        """One step's measurement: each engine's elements and seconds."""
        if not self.auto or self.steps >= AUTO_SHARE_STEPS or cpu_s <= 0 or dev_s <= 0:
            return
        cpu_rate, dev_rate = cpu_elems / cpu_s, dev_elems / dev_s
        target = dev_rate / (cpu_rate + dev_rate)
        self.share = min(_BOUNDS[1], max(_BOUNDS[0], 0.5 * (self.share + target)))
        self.steps += 1

    def state_dict(self) -> dict:
        """The automatic split, for checkpoints (empty when the split is fixed)."""
        return {"stream_share": self.share, "stream_share_steps": self.steps} if self.auto else {}

    def load_state_dict(self, state: dict) -> None:
        if self.auto and "stream_share" in state:
            self.share = float(state["stream_share"])
            self.steps = int(state.get("stream_share_steps", AUTO_SHARE_STEPS))
