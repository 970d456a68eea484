"""The training loop: micro-batches, optimizer steps, eval, samples, checkpoints, events.

Knows the Engine protocol (engine.py) and nothing of how an engine places memory. Stops cleanly on
SIGINT/SIGTERM and on the run folder's control file (the app's pause/save/stop keys), saving first.
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

from homestar.train import events as ev
from homestar.errors import CheckpointError
from homestar.train.checkpoint import save_checkpoint
from homestar.train.config import RunConfig
from homestar.train.control import Control
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
                 progress: Progress | None = None, flops_per_token: float):
        from homestar.data import TokenStream

        self.config, self.run_dir, self.engine, self.model, self.data = config, run_dir, engine, model, data
        self.sinks = sinks
        self.progress = progress or Progress()
        self.flops_per_token = flops_per_token
        self.schedule = Schedule(lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                                 decay_steps=config.decay_steps)
        self.stream = TokenStream(data.train, seq_len=config.seq_len, micro_batch=config.micro_batch,
                                  seed=config.seed)
        if self.progress.data:
            self.stream.load_state_dict(self.progress.data)
        self.control = Control(run_dir)
        self._last_chunks = -math.inf
        self._last_saved = self.progress.step
        self._process = psutil.Process()

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
            action = self.control.poll()
            if action == "stop":
                return "stopped"
            if action == "save":
                self.save()
            if action == "pause" and self._pause() == "stop":
                return "stopped"
            if self.control.extend_to:
                self._extend(self.control.extend_to)
            self.train_step()
            self._after_step()
        return "finished"

    def train_step(self) -> None:
        cfg, step = self.config, self.progress.step
        t0 = time.perf_counter()
        losses = []
        for _ in range(cfg.accum):
            x, y = self.stream.next_batch()
            losses.append(self.engine.forward_backward(x, y, cfg.accum))
        lr = self.schedule(step)
        report = self.engine.step(lr)
        loss = float(torch.stack(losses).float().mean())  # note: CPU-GPU sync, once per optimizer step
        elapsed = time.perf_counter() - t0
        self.progress.step = step + 1
        self.progress.tokens += cfg.tokens_per_step
        self.progress.data = self.stream.state_dict()
        tok_s = cfg.tokens_per_step / elapsed
        memory = self.engine.memory()
        self.emit(ev.Step(time=self._now(), step=self.progress.step, loss=loss, lr=lr, tokens=self.progress.tokens,
                          tok_s=tok_s, tflops=tok_s * self.flops_per_token / 1e12, gpu_mem=memory["gpu_mem"],
                          cpu_mem=float(self._process.memory_info().rss), grad_norm=report.grad_norm,
                          skipped=report.skipped, step_s=elapsed, timings=report.timings))

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
        stream = TokenStream(self.data.val, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=cfg.seed + 1,
                             split="validation")
        total = torch.zeros(())
        for _ in range(cfg.eval_batches):
            x, y = stream.next_batch()
            total += self.engine.eval_loss(x, y).float().cpu()  # note: sync per eval batch
        loss = float(total) / cfg.eval_batches
        self.emit(ev.Eval(time=self._now(), step=self.progress.step, loss=loss))
        return loss

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
            path = save_checkpoint(self.run_dir, self.progress.step, self.engine.state_dict(), progress,
                                   keep=self.config.keep_checkpoints)
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

    def _extend(self, steps: int) -> None:
        self.control.extend_to = None
        if steps > self.config.steps:
            self.config.steps = steps
            self.config.save(self.run_dir)
            self.emit(ev.Status(time=self._now(), step=self.progress.step, state="extended",
                                message=f"training extended to {steps} steps"))
