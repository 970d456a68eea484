"""Starting and resuming runs: from user choices to a Trainer ready to run.

Everything that can fail on bad input (preset, flags, data, checkpoint) is checked before the run
folder is created or touched, so a refused command leaves the disk as it was.
Under torchrun every rank builds the same model and engine; rank 0 alone picks and writes the run
folder (config, tokenizer, lock, metrics) and the others follow the folder it names.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from homestar.errors import CheckpointError, ConfigError
from homestar.train import events as ev
from homestar.train.build import build_engine, build_model, load_run_data, RunData, resolve_device, resolve_precision
from homestar.train.checkpoint import list_checkpoints, load_latest, restore_rng
from homestar.train.config import RunConfig
from homestar.train.distributed import Ranks, join_from_env, leave
from homestar.train.lock import RunLock, is_locked
from homestar.train.runs import remember_run
from homestar.train.trainer import Progress, Trainer

DEFAULT_DECAY_STEPS = 5000


@dataclass(kw_only=True, slots=True)
class TrainRequest:
    """What the user asked `homestar train` for; None means "the preset's or the plan's default"."""

    preset: str = "auto"
    data: str | None = None
    tokenizer: str | None = None
    steps: int = 1000
    run_dir: str | None = None
    device: str = "auto"
    gpu_mem_gib: float | None = None
    cpu_mem_gib: float | None = None
    micro_batch: int | None = None
    accum: int | None = None
    seq_len: int | None = None
    save_every: int = 100
    eval_every: int = 50
    eval_batches: int = 4
    sample_every: int = 100
    seed: int = 1337
    precision: str = "auto"
    runtime: str = "chunked"
    lr: float | None = None
    decay_steps: int | None = None
    chunk_elems: int | None = None
    activation_checkpointing: bool | None = None
    host_chunk_gib: float | None = None
    """Set from the plan for --preset auto: the chunk runtime's own host budget."""
    init_from: str | None = None
    """A local Hugging Face GPT-2 folder to start from: its shape, weights and tokenizer replace
    the preset's (whose name must then be left at "auto") and the learned tokenizer."""


def _pick_preset(request: TrainRequest, device: str):
    """The preset asked for; for "auto", the plan's recommendation with the plan's settings
    filled into the request wherever the user left them open. With --init-from, the folder's
    shape with the training defaults of the nearest shipped preset (no plan is made)."""
    from homestar.model import load_preset

    if request.init_from:
        from homestar.hf import init_preset, model_folder

        if request.preset != "auto":
            raise ConfigError("--preset cannot be combined with --init-from: the model's shape comes from the folder")
        if request.tokenizer:
            raise ConfigError("--tokenizer cannot be combined with --init-from: the folder's tokenizer is used")
        return init_preset(model_folder(request.init_from), seq_len=request.seq_len)
    if request.preset != "auto":
        return load_preset(request.preset)
    from homestar.errors import BudgetError
    from homestar.paths import runs_dir
    from homestar.planner import make_plan, probe

    plans = make_plan(probe(runs_dir()), gpu_mem_gib=request.gpu_mem_gib, cpu_mem_gib=request.cpu_mem_gib,
                      device=device)
    best = next(p for p in plans if p.recommended)
    if best.fits == "no":
        raise BudgetError(f"no preset fits this machine ({best.preset}: {best.reason})")
    for name in ("micro_batch", "accum", "chunk_elems"):
        if getattr(request, name) is None:
            setattr(request, name, getattr(best, name))
    request.host_chunk_gib = best.host_chunk_gib  # the chunks' share, handed to the runtime as it is
    return load_preset(best.preset)


def make_config(request: TrainRequest, name: str) -> RunConfig:
    """The run's configuration before data is known (data fields are filled in by start_run)."""
    device = resolve_device(request.device)
    preset = _pick_preset(request, device)
    shape = dataclasses.asdict(preset.model)
    if request.seq_len is not None:
        if request.seq_len < 1:
            raise ConfigError(f"--seq-len must be a positive whole number, got {request.seq_len}")
        shape["seq_len"] = request.seq_len
    from homestar.model import GPTConfig

    model_config = GPTConfig(**shape)
    t = preset.train
    lr = request.lr if request.lr is not None else t.lr
    return RunConfig(
        name=name, preset=preset.name, model=shape, params=model_config.num_params(),
        data={}, tokenizer_hash="", steps=request.steps,
        micro_batch=request.micro_batch if request.micro_batch is not None else t.micro_batch,
        accum=request.accum if request.accum is not None else t.accum,
        seed=request.seed, save_every=request.save_every, eval_every=request.eval_every,
        eval_batches=request.eval_batches, sample_every=request.sample_every, device=device,
        precision=resolve_precision(request.precision, device), runtime=request.runtime,
        gpu_mem_gib=request.gpu_mem_gib, cpu_mem_gib=request.cpu_mem_gib, chunk_elems=request.chunk_elems,
        host_chunk_gib=request.host_chunk_gib,
        activation_checkpointing=(device == "cuda") if request.activation_checkpointing is None
        else request.activation_checkpointing,
        lr=lr, min_lr=min(t.min_lr, lr), warmup_steps=t.warmup_steps,
        decay_steps=request.decay_steps if request.decay_steps is not None else max(DEFAULT_DECAY_STEPS, request.steps),
        weight_decay=t.weight_decay, grad_clip=t.grad_clip, beta1=t.beta1, beta2=t.beta2,
        init_from=str(Path(request.init_from).expanduser().resolve()) if request.init_from else None,
    )


def _new_run_dir(request: TrainRequest, preset: str) -> Path:
    from homestar.paths import runs_dir

    if request.run_dir:
        path = Path(request.run_dir).expanduser()
        if path.exists() and (not path.is_dir() or not _fresh_or_unstarted(path)):
            raise ConfigError(f"{path} already exists and is not empty; use `homestar resume {path}` to continue it")
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = runs_dir() / f"{preset}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = runs_dir() / f"{preset}-{stamp}-{n}"
    return path


_UNSTARTED = frozenset({".lock", "tokenizer.json", "config.json.tmp"})
"""What a `train` killed before writing config.json can leave; such a folder may be started again."""


def _fresh_or_unstarted(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    return names <= _UNSTARTED and not is_locked(path)


@dataclass(kw_only=True, slots=True)
class Session:
    """A trainer with its run folder locked; `run()` trains and releases everything."""

    trainer: Trainer
    lock: RunLock
    sinks_to_close: list
    resumed: bool

    def run(self) -> str:
        ended_well = False
        try:
            status = self.trainer.run(resumed=self.resumed)
            ended_well = True
            return status
        except BaseException as exc:
            if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self.trainer.emit(ev.Error(time=time.time(), step=self.trainer.progress.step,
                                           message=f"{type(exc).__name__}: {exc}"))
                self.trainer.emit(ev.End(time=time.time(), step=self.trainer.progress.step, status="failed"))
            raise
        finally:
            self.trainer.engine.close()
            for sink in self.sinks_to_close:
                sink.close()
            self.lock.release()
            leave(together=ended_well)


def start_run(request: TrainRequest, sinks: list) -> Session:
    from homestar.data import load_tokenizer, load_tokens, resolve_source, tokenizer_hash
    from homestar.paths import cache_dir

    config = make_config(request, name="")
    ranks = _join(config)
    config.world = ranks.world
    run_dir = Path(ranks.broadcast(str(_new_run_dir(request, config.preset)) if ranks.main else None))
    source = resolve_source(request.data)
    if not ranks.main:
        ranks.barrier()  # rank 0 builds the tokenizer and token caches first; the others read them
    tokenizer_path = Path(request.tokenizer).expanduser() if request.tokenizer else None
    if config.init_from:
        from homestar.hf import read_tokenizer

        tokenizer = read_tokenizer(Path(config.init_from), vocab_size=config.model["vocab_size"])
    else:
        tokenizer = load_tokenizer(source, config.model["vocab_size"], cache_dir=cache_dir(),
                                   tokenizer_path=tokenizer_path)
    tokens = load_tokens(source, tokenizer, cache_dir=cache_dir())
    if ranks.main:
        ranks.barrier()
    _check_enough_tokens(tokens.train, tokens.val, config)
    config.name = run_dir.name
    config.data = {"source": source.spec, "kind": source.kind, "description": source.description,
                   "fingerprint": source.fingerprint}
    config.tokenizer_hash = tokenizer_hash(tokenizer)
    model = build_model(config)
    engine = _distributed_engine(config, model, ranks)
    if config.init_from:
        _load_init_weights(engine, config)
    lock = RunLock(run_dir)  # acquired by rank 0 alone, for all; releasing an unacquired one does nothing
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        config.save(run_dir)
        remember_run(run_dir)
        tokenizer.save(str(run_dir / "tokenizer.json"))
    ranks.barrier()
    data = RunData(tokenizer=tokenizer, train=tokens.train, val=tokens.val)
    return _session(config, run_dir, engine, model, data, sinks, lock, Progress(), resumed=False, ranks=ranks)


def _join(config: RunConfig) -> Ranks:
    ranks = join_from_env(config.device)
    if ranks.world > 1 and config.runtime == "torch":
        raise ConfigError("--runtime torch trains on one process; use --runtime chunked under torchrun")
    return ranks


def _distributed_engine(config: RunConfig, model, ranks: Ranks):
    """The run's engine, sharing the optimizer's work (and its state's memory) among the ranks
    when there are several: the collective is known before attach allocates any chunk."""
    if ranks.world == 1:  # _join refuses --runtime torch on several ranks
        return build_engine(config, model)
    from homestar.runtime.collectives import Collective

    return build_engine(config, model, Collective.current())


def resume_run(run_dir: Path, sinks: list, *, steps: int | None = None) -> Session:
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder")
    config = RunConfig.load(run_dir)
    target = config.steps if steps is None else steps
    if target < 1:  # before anything is built
        raise ConfigError(f"--steps must be a positive whole number, got {target}")
    ranks = _join(config)
    lock = RunLock(run_dir)  # acquired by rank 0 alone, for all; releasing an unacquired one does nothing
    if ranks.main:
        lock.acquire()
    engine = None
    try:
        data = load_run_data(config, run_dir)
        model = build_model(config)
        engine = _distributed_engine(config, model, ranks)  # first: it says which moments this rank keeps
        loaded = None
        if ranks.broadcast(bool(list_checkpoints(run_dir)) if ranks.main else None):  # one answer for all
            loaded = load_latest(run_dir, ranks=ranks, wants=engine.owned_names())
        progress = Progress()
        if loaded is not None:
            trainer_state = loaded[1]
            progress = Progress(step=int(trainer_state["step"]), tokens=int(trainer_state.get("tokens", 0)),
                                data=dict(trainer_state.get("data", {})))
        if target <= progress.step:
            raise ConfigError(f"{run_dir.name} is already at step {progress.step}; pass --steps N with N above it")
        if loaded is not None:
            _load_agreed(engine, loaded[0], run_dir, ranks)
            restore_rng(loaded[1])
        elif config.init_from:  # stopped before its first checkpoint: start from the folder again
            _load_init_weights(engine, config)
        config.steps = target
        if ranks.main:
            config.save(run_dir)
            ev.truncate_events(run_dir / "metrics.jsonl", progress.step)
        ranks.barrier()
    except BaseException:
        if engine is not None:
            engine.close()
        lock.release()
        raise
    return _session(config, run_dir, engine, model, data, sinks, lock, progress, resumed=True, ranks=ranks)


def _load_agreed(engine, state: dict, run_dir: Path, ranks: Ranks) -> None:
    """Copy a loaded checkpoint into the engine; a problem any rank meets is raised on all of
    them (one small gather across ranks), so none is left waiting for the others. The tensors
    are read from their files here, after the checkpoint was verified: one that became
    unreadable since is a CheckpointError too."""
    problem = None
    try:
        engine.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as exc:
        problem = f"the checkpoint in {run_dir} does not fit this run's model ({exc})"
    except OSError as exc:
        problem = f"checkpoint file {exc.filename} became unreadable ({exc.strerror})"
    except CheckpointError as exc:
        problem = str(exc)
    problems = [p for p in ranks.gather(problem) if p]
    if problems:
        raise CheckpointError(problems[0])


def _load_init_weights(engine, config: RunConfig) -> None:
    """Put the --init-from folder's weights into the engine, with a fresh optimizer (step 0).
    Cost: the whole model once more in fp32 host memory while it is copied in."""
    from homestar.hf import read_weights
    from homestar.model import GPTConfig

    folder = Path(config.init_from)
    if not folder.is_dir():
        raise CheckpointError(f"the run starts from {folder}, which is gone, and has no checkpoint yet")
    weights = read_weights(folder, GPTConfig(**config.model))
    engine.load_state_dict({"weights": weights, "optimizer": {"step": 0, "exp_avg": {}, "exp_avg_sq": {}}})


def _session(config, run_dir, engine, model, data, sinks, lock, progress, *, resumed, ranks: Ranks) -> Session:
    from homestar.model import GPTConfig

    own = [ev.JsonlSink(run_dir / "metrics.jsonl")] if ranks.main else []  # rank 0 alone reports
    trainer = Trainer(config=config, run_dir=run_dir, engine=engine, model=model, data=data,
                      sinks=[*own, *sinks] if ranks.main else [], progress=progress,
                      flops_per_token=GPTConfig(**config.model).flops_per_token(), ranks=ranks)
    return Session(trainer=trainer, lock=lock, sinks_to_close=own, resumed=resumed)


def _check_enough_tokens(train, val, config: RunConfig) -> None:
    from homestar.errors import DataError

    need = config.seq_len + 1
    if len(train) < need or len(val) < need:
        raise DataError(f"the data is too small: {len(train):,} training and {len(val):,} validation tokens, "
                        f"but one sequence needs {need:,}; give more text or a smaller --seq-len")

