"""Host memory of resuming from a checkpoint: the state read one tensor at a time as the engine
copies it into its chunks (what `homestar train` does), against the whole state read first.

    python bench/resume_memory.py [--d-model 1024] [--layers 8] [--dir /tmp/resume_memory]

Saves a checkpoint of a GPT trained one step by the chunk runtime (fp32, CPU), then resumes it
in two fresh processes, one per way, and prints each one's peak RSS after building the engine
and after loading. Reading whole costs about 12 bytes per parameter (fp32 weights and both
moments) on top of the chunks; reading lazily, about the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

GIB = 2**30


def _engine(d_model: int, layers: int):
    import torch

    from homestar.model import GPT, GPTConfig
    from homestar.optim import OptimConfig
    from homestar.runtime import RuntimeConfig, attach

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50304, seq_len=128, d_model=d_model, n_layer=layers, n_head=d_model // 64)
    engine = attach(GPT(config), RuntimeConfig(device="cpu", precision="fp32"), OptimConfig(lr=1e-4))
    return engine, config


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def child(mode: str, run_dir: Path, d_model: int, layers: int) -> None:
    import torch

    from homestar.train.checkpoint import load_latest, save_checkpoint

    engine, config = _engine(d_model, layers)
    if mode == "save":
        idx = torch.randint(0, config.vocab_size, (1, config.seq_len))
        engine.forward_backward(idx, idx, 1.0)
        engine.step(1e-4)
        save_checkpoint(run_dir, 1, engine.checkpoint_state(), {"data": {}, "tokens": 0})
        print(json.dumps({"params": config.num_params()}))
        return
    built = _peak_gib()
    state, _ = load_latest(run_dir)
    if mode == "whole":  # every tensor read before any is copied in
        opt = state["optimizer"]
        state = {"weights": dict(state["weights"]),
                 "optimizer": {**opt, "exp_avg": dict(opt["exp_avg"]), "exp_avg_sq": dict(opt["exp_avg_sq"])}}
    engine.load_state_dict(state)
    print(json.dumps({"built_gib": built, "loaded_gib": _peak_gib()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/resume_memory"))
    parser.add_argument("--child", choices=["save", "lazy", "whole"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.d_model, args.layers)
        return

    def run(mode: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(args.dir),
                              "--d-model", str(args.d_model), "--layers", str(args.layers)],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    params = run("save")["params"]
    print(f"{params / 1e6:.0f}M parameters; checkpoint in {args.dir}")
    for mode in ("lazy", "whole"):
        r = run(mode)
        print(f"{mode:5}: peak RSS {r['built_gib']:.2f} GiB after building, {r['loaded_gib']:.2f} GiB after loading "
              f"(+{r['loaded_gib'] - r['built_gib']:.2f})")


if __name__ == "__main__":
    main()
