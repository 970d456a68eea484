"""The training loop: micro-batches, optimizer steps, eval, samples, checkpoints, events.

Knows the Engine protocol (engine.py) and nothing of how an engine places memory. Stops cleanly on
SIGINT/SIGTERM and on the run folder's control file (the app's pause/save/stop keys), saving first.

Across ranks (torchrun): every step's global batch is the same sequences whatever the number of
ranks (a draw of draw_batch * world sequences; rank r trains on rows r*draw_batch...), so N ranks
at micro-batch m compute what one rank at micro-batch N*m does. Rank 0 decides stops and pauses
for all; only its sinks are given events; losses are averaged over ranks.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch

from homestar.errors import BudgetError, CheckpointError, ConfigError
from homestar.train import events as ev
from homestar.train import faults
from homestar.train.checkpoint import save_checkpoint
from homestar.train.config import RunConfig
from homestar.train.control import Control
from homestar.train.distributed import Ranks
from homestar.train.memory_guard import MemoryGuard, default_threshold
from homestar.train.recovery import first_line, free_cached_memory, is_out_of_memory, smaller_micro_batch
from homestar.train.sampling import sample_text
from homestar.train.schedule import Schedule

CHUNK_EVENT_SECONDS = 2.0
"""Least time between two `chunks` placement snapshots (they are large for big models)."""


@dataclass(kw_only=True, slots=True)
class Progress:
    """What a checkpoint must hold besides the engine state to continue exactly."""

    step: int = 0
    tokens: int = 0
    data: dict = field(default_factory=dict)


class Trainer:
    def __init__(self, *, config: RunConfig, run_dir: Path, engine, model, data, sinks: list[Callable],
                 progress: Progress | None = None, flops_per_token: float, ranks: Ranks | None = None):
        from homestar.data import TokenStream

        self.config, self.run_dir, self.engine, self.model, self.data = config, run_dir, engine, model, data
        self.ranks = ranks or Ranks()
        self.rows, self.micro, self.local_accum = self._share(config)
        self.sinks = sinks
        self.progress = progress or Progress()
        self.flops_per_token = flops_per_token
        self.schedule = Schedule(lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                                 decay_steps=config.decay_steps)
        # one global stream (the same on every rank): its cursor means the same at any world size
        self.stream = TokenStream(data.train, seq_len=config.seq_len,
                                  micro_batch=config.global_draw, seed=config.seed)
        if self.progress.data:
            self.stream.load_state_dict(self.progress.data)
        self.control = Control(run_dir)
        self._last_chunks = -math.inf
        self._last_saved = self.progress.step
        self._process = psutil.Process()
        self._step_need: int | None = None
        """GPU bytes the last step needed above its resting memory (None before the first)."""
        faults.arm_from_env()
        self.memory_guard = MemoryGuard(threshold=default_threshold())

    # -- events -------------------------------------------------------------------------------
    def emit(self, event: ev.Event) -> None:
        for sink in self.sinks:
            sink(event)

    def _now(self) -> float:
        return time.time()

    # -- the loop -----------------------------------------------------------------------------
    def run(self, *, resumed: bool = False) -> str:
        """Train to config.steps (or until asked to stop); returns "finished" or "stopped"."""
        cfg = self.config
        self.emit(ev.Start(time=self._now(), step=self.progress.step, run=self.run_dir.name, preset=cfg.preset,
                           params=cfg.params, total_steps=cfg.steps, tokens_per_step=cfg.tokens_per_step,
                           runtime=cfg.runtime, device=cfg.device, precision=cfg.precision, resumed=resumed))
        self._maybe_chunks(force=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            status = self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self._last_saved != self.progress.step:
            self.save(final=True)
        self.emit(ev.End(time=self._now(), step=self.progress.step, status=status))
        return status

    def _loop(self) -> str:
        while self.progress.step < self.config.steps:
            # Rank 0 alone reads the control file (reading consumes it) and the machine's memory;
            # one broadcast per step tells the others (a sync only when there are others).
            action, extend_to, short = self.ranks.broadcast(self._requests() if self.ranks.main else None)
            if action == "stop":
                return "stopped"
            if action == "save":
                self.save()
            if action == "pause" and self.ranks.broadcast(self._pause() if self.ranks.main else None) == "stop":
                return "stopped"
            if extend_to:
                self._extend(extend_to)
            if short and self.ranks.broadcast(self._wait_for_memory() if self.ranks.main else None) == "stop":
                return "stopped"
            self.train_step()
            self._after_step()
        return "finished"

    def train_step(self) -> None:
        cfg, step = self.config, self.progress.step
        faults.maybe_squeeze(step + 1, cfg.device, self._step_need)
        t0 = time.perf_counter()
        first = self.stream.batches
        losses = self._recovering(lambda: self._accumulate(first, step + 1))
        self.stream.batches = first + cfg.draws_per_step
        lr = self.schedule(step)
        report = self.engine.step(lr)
        faults.reach("step")
        loss = float(self.ranks.mean(torch.stack(losses).float().mean()))  # note: CPU-GPU sync, once per step
        elapsed = time.perf_counter() - t0
        self.progress.step = step + 1
        self.progress.tokens += cfg.tokens_per_step
        self.progress.data = self.stream.state_dict()
        tok_s = cfg.tokens_per_step / elapsed
        memory = self.engine.memory()
        self._step_need = int(memory["gpu_peak"] - memory["gpu_mem"])  # above resting: sizes a test squeeze
        self.emit(ev.Step(time=self._now(), step=self.progress.step, loss=loss, lr=lr, tokens=self.progress.tokens,
                          tok_s=tok_s, tflops=tok_s * self.flops_per_token / 1e12, gpu_mem=memory["gpu_peak"],
                          cpu_mem=float(self._process.memory_info().rss), grad_norm=report.grad_norm,
                          skipped=report.skipped, step_s=elapsed, timings=report.timings))

    def _accumulate(self, first_draw: int, step_number: int) -> list[torch.Tensor]:
        """Forward/backward over one step's sequences: draws first_draw... of draw_batch
        sequences each, every draw cut into micro-batches (views, no copy). The draws, not the
        micro-batches, fix which sequences a step sees, so a smaller micro-batch sees the same."""
        cfg = self.config
        losses = []
        for k in range(first_draw, first_draw + cfg.draws_per_step):
            x, y = self._my_rows(*self.stream.batch_at(k))
            for xs, ys in zip(x.split(self.micro), y.split(self.micro)):
                # grads of loss / (micro-batches per rank * world), summed over ranks by the
                # engine: the mean over the global batch, whatever the number of ranks
                losses.append(self.engine.forward_backward(xs, ys, self.local_accum * self.ranks.world))
                faults.reach("micro-batch")
        faults.maybe_oom(step_number)
        return losses

    def _share(self, cfg: RunConfig) -> tuple[int, int, int]:
        """(rows of each global draw this rank trains on, its micro-batch, its micro-batches per
        step). A run resumed on another number of ranks keeps its global batch: each rank's
        share changes, and the micro-batch shrinks to a divisor of it if needed."""
        world = self.ranks.world
        if cfg.global_draw % world:
            raise ConfigError(f"this run draws {cfg.global_draw} sequences at a time, which {world} "
                              f"processes cannot share evenly; use a number of processes that divides it")
        rows = cfg.global_draw // world
        micro = math.gcd(cfg.micro_batch, rows)
        return rows, micro, cfg.draws_per_step * rows // micro

    def _my_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of a global draw (views, no copy)."""
        if self.rows == len(x):
            return x, y
        rows = slice(self.ranks.rank * self.rows, (self.ranks.rank + 1) * self.rows)
        return x[rows], y[rows]

    def _recovering(self, work: Callable):
        """Run `work`; on running out of GPU or pinned memory, shrink the micro-batch and redo it.
        Gives up (re-raises) when the micro-batch is already 1, or across ranks (they would have
        to agree on the new shape)."""
        if self.ranks.world > 1:
            return work()
        while True:
            try:
                return work()
            except (RuntimeError, BudgetError) as exc:  # torch.OutOfMemoryError, or BudgetError raised from one
                if not is_out_of_memory(exc) or smaller_micro_batch(self.config.micro_batch) is None:
                    raise
                reason = first_line(exc, 160)
            # Outside the except block: the traceback, and the activations its frames held, are gone.
            self._shrink_micro_batch(reason)

    def _shrink_micro_batch(self, reason: str) -> None:
        """Discard the failed work's grads, free caches, split micro-batches (same global batch),
        record the new shape in config.json and tell the user."""
        cfg = self.config
        old_micro, old_accum = cfg.micro_batch, cfg.accum
        new_micro = smaller_micro_batch(old_micro)
        self.engine.zero_grad()  # drop what the failed work accumulated: the redo starts from zero
        free_cached_memory(cfg.device)
        cfg.data_micro_batch = cfg.draw_batch
        cfg.micro_batch, cfg.accum = new_micro, old_accum * (old_micro // new_micro)
        self.rows, self.micro, self.local_accum = self._share(cfg)
        cfg.save(self.run_dir)
        self.emit(ev.Status(time=self._now(), step=self.progress.step, state="oom-recovered",
                            message=f"out of memory ({reason}); micro-batch {old_micro} -> {new_micro}, "
                                    f"accumulation {old_accum} -> {cfg.accum} (same global batch), step redone"))

    def _after_step(self) -> None:
        cfg, step = self.config, self.progress.step
        if cfg.eval_every and step % cfg.eval_every == 0:
            self.evaluate()
        if cfg.sample_every and step % cfg.sample_every == 0:
            self.sample()
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()
        self._maybe_chunks()

    # -- periodic work ------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean loss over the same fixed validation batches every time."""
        from homestar.data import TokenStream

        cfg = self.config
        stream = TokenStream(self.data.val, seq_len=cfg.seq_len, micro_batch=cfg.global_draw,
                             seed=cfg.seed + 1, split="validation")
        total = self.ranks.mean(self._recovering(lambda: self._eval_total(stream, stream.batches)))
        loss = float(total) / cfg.eval_batches
        self.emit(ev.Eval(time=self._now(), step=self.progress.step, loss=loss))
        return loss

    def _eval_total(self, stream, first: int) -> torch.Tensor:
        """Sum over the eval draws of each draw's mean loss (micro-batch pieces averaged)."""
        draws = []
        for k in range(first, first + self.config.eval_batches):
            x, y = self._my_rows(*stream.batch_at(k))
            # the losses stay where the engine computed them: no sync per micro-batch
            draws.append(torch.stack([self.engine.eval_loss(xs, ys)
                                      for xs, ys in zip(x.split(self.micro), y.split(self.micro))]))
        grid = torch.stack(draws).float().cpu()  # note: CPU-GPU sync, once per eval
        total = torch.zeros(())
        for pieces in grid:  # every draw has as many pieces; the mean of one piece is that piece
            total += pieces.mean()
        return total

    def sample(self) -> None:
        prompt_ids = [int(t) for t in self.data.val[:8]]
        prompt = self.data.tokenizer.decode(prompt_ids)
        generator = torch.Generator().manual_seed(self.config.seed + self.progress.step)
        text = sample_text(self.engine, self.model, self.data.tokenizer, prompt, max_tokens=32,
                           generator=generator, device=self.config.device)
        self.emit(ev.Sample(time=self._now(), step=self.progress.step, prompt=prompt, text=text))

    def save(self, *, final: bool = False) -> Path | None:
        """Checkpoint now. A periodic save that fails (full disk) is reported and training goes
        on with the previous checkpoint intact; a failed final save is an error for the caller."""
        progress = {"tokens": self.progress.tokens, "data": self.progress.data}
        try:
            path = save_checkpoint(self.run_dir, self.progress.step, self.engine.checkpoint_state(), progress,
                                   keep=self.config.keep_checkpoints, ranks=self.ranks)
        except CheckpointError as exc:
            if final:
                raise
            self.emit(ev.Error(time=self._now(), step=self.progress.step, message=str(exc)))
            return None
        self._last_saved = self.progress.step
        self.emit(ev.Checkpoint(time=self._now(), step=self.progress.step, path=str(path)))
        return path

    def _maybe_chunks(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_chunks < CHUNK_EVENT_SECONDS:
            return
        snapshot = self.engine.chunk_snapshot()
        if snapshot is not None:
            self._last_chunks = now
            self.emit(ev.Chunks(time=self._now(), step=self.progress.step, chunks=snapshot))

    # -- control ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.control.request_stop()

    def _pause(self) -> str:
        self.emit(ev.Status(time=self._now(), step=self.progress.step, state="paused", message="training paused"))
        action = self.control.wait_while_paused()
        self.emit(ev.Status(time=self._now(), step=self.progress.step, state="running", message="training resumed"))
        return action

    def _wait_for_memory(self) -> str:
        """Pause while the machine is short of memory (other programs grew); "stop" if asked to."""
        guard = self.memory_guard
        self.emit(ev.Status(time=self._now(), step=self.progress.step, state="waiting-for-memory",
                            message=f"only {guard.available() / 2**30:.2f} GiB of memory available, under "
                                    f"{guard.threshold / 2**30:.2f} GiB: waiting for other programs to free some"))
        action = guard.wait(should_stop=self._stop_requested_while_waiting)
        if action == "running":
            self.emit(ev.Status(time=self._now(), step=self.progress.step, state="running",
                                message="memory available again, training goes on"))
        return action

    def _stop_requested_while_waiting(self) -> bool:
        action = self.control.poll()
        if action == "save":
            if self.ranks.world == 1:
                self.save()
            else:  # a save takes every rank, and the others wait in a broadcast: save after the wait
                self.control.requeue("save")
        return action == "stop"

    def _requests(self) -> tuple[str | None, int | None, bool]:
        """(control action, steps to extend to, memory short?), read between two steps."""
        return self.control.poll(), self.control.extend_to, self.memory_guard.short()

    def _extend(self, steps: int) -> None:
        self.control.extend_to = None
        if steps > self.config.steps:
            self.config.steps = steps
            if self.ranks.main:  # one writer of config.json
                self.config.save(self.run_dir)
            self.emit(ev.Status(time=self._now(), step=self.progress.step, state="extended",
                                message=f"training extended to {steps} steps"))
