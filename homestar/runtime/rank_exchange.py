"""What an optimizer step exchanges among ranks (group-owner ZeRO, `collectives.Collective`).

Each chunk group's grads are summed onto its owner rank: on the device as the step's last
backward completes the grad chunk (`reduce_in_backward`: the collective runs while backward goes
on), or in the step for a chunk that was not (`stage_grads`); after the owners' update each
group's param chunk is broadcast from its owner (`share_params`): from and into the device copy
where one is cached (left newer than its host copy), else through the host buffer. At world 1
every collective returns at once and nothing is staged. Chunks are held and let go through the
optimizer's callbacks (where a group's chunks live is its business). Knows nothing of AdamW's
maths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from homestar.runtime.binding import ParamInfo
from homestar.runtime.chunk import Chunk, ChunkGroup
from homestar.runtime.collectives import Collective

Hold = Callable[[Chunk, list[ParamInfo]], torch.Tensor]
LetGo = Callable[[Chunk, list[ParamInfo]], None]


class RankExchange:
    """The grads' and params' trips between ranks in one optimizer step."""

    def __init__(self, groups: list[ChunkGroup], hold: Hold, let_go: LetGo, hold_param: Hold) -> None:
        self.groups = groups
        self._hold = hold
        self._let_go = let_go
        self._hold_param = hold_param
        """Holds a param chunk for the share: its device copy where one is cached (the owner
        broadcasts from it, the others receive into it: no trip through host memory), else
        where it lives."""
        self.collective = Collective()
        """Which ranks share the work; groups not owned here get no update here."""
        self.reduced: set[int] = set()
        """Groups whose grads were summed onto their owner during backward (this step)."""
        self.held: set[int] = set()
        """Groups whose grad chunks `stage_grads` holds (let go when the step ends)."""
        self.reduced_in_backward = 0
        """Grad chunks summed onto their owner during backward, over the run (for tests)."""
        self.shared_on_device = 0
        """Param chunks broadcast from or into their device copy, over the run (for tests)."""

    def reduce_in_backward(self, chunk: Chunk):
        """Start summing a completed grad chunk (held on the device) onto its group's owner rank,
        where it lies: no host round trip, and the collective runs while backward goes on.
        Returns the finisher the hooks run before letting the chunk go: it makes later work
        wait for the sum (a stream wait under NCCL), and on the other ranks marks the device
        copy as not worth writing back (its sum went to the owner)."""
        index = chunk.group
        work = self.collective.reduce_to_owner(chunk.device, index)  # async; fp32 (see collectives)
        self.reduced.add(index)
        self.reduced_in_backward += 1
        owner = self.collective.owns(index)

        def finish() -> None:
            work.wait()
            if not owner:
                chunk.device_dirty = False

        return finish

    def stage_grads(self, by_group: dict[int, list[ParamInfo]]) -> dict[int, torch.Tensor]:
        """Each active grad as a view where its group's optimizer runs (grad chunks held).
        Across ranks each is summed onto its owner, issued in group order on every rank with two
        in flight: one reduces while the next is staged, and under NCCL no more than two host
        chunks' staged copies take GPU memory at once."""
        grads: dict[int, torch.Tensor] = {}
        pending: list = []
        for index, infos in by_group.items():
            reduced = index in self.reduced
            if reduced and not self.collective.owns(index):
                continue  # summed onto its owner already; nothing here needs it
            chunk = self.groups[index].grad
            tensor = self._hold(chunk, infos)
            self.held.add(index)
            for info in infos:
                grads[info.index] = chunk.view(tensor, info.slot, info.shape)
            if not reduced:
                pending.append(self.collective.reduce_to_owner(tensor, index))
                if len(pending) > 1:
                    pending.pop(0).wait()
        for work in pending:
            work.wait()
        return grads

    def share_params(self, by_group: dict[int, list[ParamInfo]]) -> None:
        """Broadcast each updated group's param chunk from its owner. Nothing blocks the host
        per group: a broadcast is issued (the owner's upload queued before it), the one before
        it lands (its copy home queued behind it) and the host waits only for the copy issued
        two groups earlier, so owners' uploads, the broadcasts and the others' copies home of
        neighbouring groups overlap, with at most three staged chunks alive."""
        issued: list = []
        landed: list = []
        for index, infos in by_group.items():
            chunk = self.groups[index].param
            tensor = self._hold_param(chunk, infos)
            self.shared_on_device += tensor is chunk.device
            issued.append((self.collective.broadcast_from_owner(tensor, index), chunk, infos))
            if len(issued) > 1:
                landed.append(issued.pop(0))
                landed[-1][0].land()
            if len(landed) > 2:
                self._settle(*landed.pop(0))
        for item in issued:
            item[0].land()
        for item in landed + issued:
            self._settle(*item)

    def _settle(self, work, chunk: Chunk, infos: list[ParamInfo]) -> None:
        work.settle()  # sync: this chunk's host copy is complete before anything may read it
        self._let_go(chunk, infos)

    def let_go_grads(self, by_group: dict[int, list[ParamInfo]]) -> None:
        """The step is over: let go of the grad chunks `stage_grads` held; forget this step."""
        for index, infos in by_group.items():
            if index in self.held:
                self._let_go(self.groups[index].grad, infos)
        self.held.clear()
        self.reduced.clear()
