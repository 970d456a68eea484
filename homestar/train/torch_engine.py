"""The plain-PyTorch engine: the whole model and AdamW on one device, the reference.

This is what parity tests and `bench --baseline` compare the chunk runtime against, so it is kept
as close to textbook PyTorch as possible: autocast for bf16/fp16, fused AdamW, clip_grad_norm_.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from homestar.optim import OptimConfig, StepReport, no_decay


def autocast_context(device: str, precision: str):
    """bf16/fp16 autocast on the device, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


class TorchEngine:
    """Engine protocol (homestar.train.engine) over an nn.Module that lives wholly on `device`."""

    def __init__(self, model: nn.Module, optim: OptimConfig, *, device: str = "cpu", precision: str = "fp32"):
        self.model = model.to(device)
        self.device = device
        self.precision = precision
        self.optim_config = optim
        self.names = {p: n for n, p in model.named_parameters()}
        decay = [p for n, p in model.named_parameters() if not no_decay(n, p)]
        keep = [p for n, p in model.named_parameters() if no_decay(n, p)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=True)
        self.scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")

    def forward_backward(self, idx, targets, loss_div: float):
        self.model.train()
        with autocast_context(self.device, self.precision):
            _, loss = self.model(idx.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True))
        self.scaler.scale(loss / loss_div).backward()
        return loss.detach()

    def step(self, lr: float) -> StepReport:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        params = list(self.names)
        clip = self.optim_config.grad_clip
        # note: float() of the norm is a device->host sync, once per optimizer step
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.optimizer.zero_grad(set_to_none=True)
        return StepReport(grad_norm=float(norm), skipped=skipped)

    def zero_grad(self) -> None:
        """Forget accumulated grads (a failed step's); the next backward starts from none."""
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_loss(self, idx, targets):
        self.model.eval()
        with autocast_context(self.device, self.precision):
            _, loss = self.model(idx.to(self.device), targets.to(self.device))
        return loss.detach()

    @contextlib.contextmanager
    def inference(self):
        """Direct no-grad calls of the model (sampling) in eval mode and the run's precision."""
        self.model.eval()
        with torch.no_grad(), autocast_context(self.device, self.precision):
            yield self.model

    def owned_names(self) -> None:
        return None  # one process: every parameter's state is here

    def checkpoint_state(self) -> dict:
        """The live tensors, wherever they are (the writer copies them to the host one at a time)."""
        return self._export(lambda t: t.detach().float())

    def state_dict(self) -> dict:
        return self._export(lambda t: t.detach().float().cpu().clone())

    def _export(self, take) -> dict:
        weights = {n: take(p) for p, n in self.names.items()}
        exp_avg, exp_avg_sq, step = {}, {}, 0
        for p, n in self.names.items():
            state = self.optimizer.state.get(p)
            if state:
                exp_avg[n] = take(state["exp_avg"])
                exp_avg_sq[n] = take(state["exp_avg_sq"])
                step = int(state["step"])
        optimizer = {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        if self.scaler.is_enabled():
            optimizer["loss_scale"] = float(self.scaler.get_scale())
        return {"weights": weights, "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        weights, optimizer = state["weights"], state["optimizer"]
        with torch.no_grad():
            for p, n in self.names.items():
                p.copy_(weights[n])
        self.optimizer.state.clear()
        if optimizer.get("step", 0) > 0:
            for p, n in self.names.items():
                if n in optimizer["exp_avg"]:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(optimizer["step"]), dtype=torch.float32, device=self.device),
                        "exp_avg": optimizer["exp_avg"][n].to(self.device).clone(),
                        "exp_avg_sq": optimizer["exp_avg_sq"][n].to(self.device).clone(),
                    }
        if self.scaler.is_enabled() and "loss_scale" in optimizer:
            self.scaler.update(float(optimizer["loss_scale"]))

    def chunk_snapshot(self):
        return None

    def memory(self) -> dict[str, float]:
        if not self.device.startswith("cuda"):
            return {"gpu_mem": 0.0, "gpu_peak": 0.0, "cpu_mem": 0.0}
        gpu, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()  # host-side counters: the next call's window starts here
        return {"gpu_mem": float(gpu), "gpu_peak": float(peak), "cpu_mem": 0.0}

    def close(self) -> None:
        self.optimizer.state.clear()
