"""The training loop shared by every command that trains.

A method is an ``objective``: an ``nn.Module`` that holds the segmentation
``backbone`` (plus any heads) and whose ``forward(batch)`` returns
``(loss, {name: float})``.  The trainer owns everything else: device, mixed
precision, gradient accumulation, DDP, the learning-rate schedule, the
seeded data order, validation, atomic checkpoints, exact resume, the
cooperative STOP file, the progress bar and the events.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import RunConfig, TrainConfig
from ..data.sampling import StepSampler
from ..errors import InputError
from .checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from .device import DistributedContext
from .events import EventLog
from .runfolder import RunFolder

ValidateFn = Callable[[nn.Module, int], Dict[str, Any]]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def parameter_groups(objective: nn.Module, train: TrainConfig, encoder_lr_scale: float
                     ) -> Tuple[List[Dict[str, Any]], List[Callable[[int], float]]]:
    """AdamW parameter groups and their learning-rate factors (one per group, for ``LambdaLR``).

    Group ``"encoder"`` holds the backbone's encoder parameters (its
    ``encoder_parameter_prefixes``) at ``encoder_lr_scale x lr``; group
    ``"rest"`` holds the decoder, the output layer and any method heads at
    ``lr``.  Both follow the warm-up + cosine schedule; the encoder's factor is
    0 for the first ``train.freeze_encoder_steps`` steps.  A zero learning
    rate freezes AdamW's update exactly (the decoupled weight decay is
    ``lr x weight_decay`` too) while the gradients still flow, so every rank
    of a DDP run keeps the same set of parameters with gradients; Adam's
    moment estimates do see the frozen steps' gradients.
    """
    backbone = getattr(objective, "backbone", None)
    prefixes = tuple("backbone." + p for p in backbone.encoder_parameter_prefixes()) if backbone is not None else ()
    encoder, rest = [], []
    for name, parameter in objective.named_parameters():
        if parameter.requires_grad:
            (encoder if prefixes and name.startswith(prefixes) else rest).append(parameter)
    schedule = warmup_cosine(train.warmup_steps, train.max_steps)
    frozen = int(train.freeze_encoder_steps)

    def encoder_factor(step: int) -> float:
        return 0.0 if step < frozen else schedule(step)

    groups = [{"params": encoder, "lr": train.lr * encoder_lr_scale, "name": "encoder"},
              {"params": rest, "lr": train.lr, "name": "rest"}]
    return groups, [encoder_factor, schedule]


class Trainer:
    """Runs ``objective`` on ``dataset`` for ``config.train.max_steps`` optimisation steps.

    Args:
        run: the run folder (checkpoints, STOP file).
        config: the run's settings (train section used here; all of it saved in checkpoints).
        objective: module whose ``forward(batch)`` returns ``(loss, logs)``; has ``.backbone``.
        dataset: map-style dataset, item ``i`` = sample ``i`` of the run (see data/sampling.py).
        context: device and DDP rank.
        events: the event log (disabled on ranks other than 0).
        kind: "finetune", "pretrain", ... stored in checkpoints.
        labels: the output label table stored in checkpoints.
        validate: optional ``fn(backbone, step) -> {"dice": {...}, "mean_dice": float}``, run on rank 0.
        collate: optional DataLoader collate function.
        encoder_initialised: the backbone's encoder was loaded from a checkpoint (``--init``);
            it then trains at 0.1 x lr unless ``train.encoder_lr_scale`` says otherwise.
    """

    def __init__(self, run: RunFolder, config: RunConfig, objective: nn.Module, dataset: Dataset,
                 context: DistributedContext, events: EventLog, kind: str, labels: Dict[str, str],
                 validate: Optional[ValidateFn] = None, collate: Optional[Callable] = None,
                 encoder_initialised: bool = False):
        self.run = run
        self.config = config
        self.train_config = config.train
        self.objective = objective.to(context.device)
        self.dataset = dataset
        self.context = context
        self.events = events
        self.kind = kind
        self.labels = labels
        self.validate = validate
        self.collate = collate
        self.step = 0
        self.best_metric: Optional[float] = None
        device = context.device
        self.use_amp = bool(self.train_config.amp) and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if (self.use_amp and torch.cuda.is_bf16_supported()) else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.encoder_lr_scale = self.train_config.resolved_encoder_lr_scale(encoder_initialised)
        groups, factors = parameter_groups(self.objective, self.train_config, self.encoder_lr_scale)
        self.optimizer = torch.optim.AdamW(groups, lr=self.train_config.lr,
                                           weight_decay=self.train_config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factors)
        # Stochastic weight averaging: a copy of the backbone holding the mean of its weights after each step
        # from average_start on.  Instance normalisation keeps no running statistics, so the mean of the
        # weights is the whole averaged network (buffers, if a backbone had any, are averaged alike).
        self.averaged: Optional[torch.optim.swa_utils.AveragedModel] = None
        self.average_start = 0
        fraction = float(self.train_config.average_weights_from)
        if fraction > 0:
            self.average_start = max(1, math.ceil(fraction * self.train_config.max_steps))
            self.averaged = torch.optim.swa_utils.AveragedModel(self.objective.backbone, use_buffers=True)

    # --- state ------------------------------------------------------------------------------------------
    def _backbone(self) -> nn.Module:
        return self.objective.backbone

    def _averaged_steps(self) -> int:
        return int(self.averaged.n_averaged) if self.averaged is not None else 0

    def network(self) -> nn.Module:
        """The network a user gets: the averaged weights once averaging has begun, else the trained ones."""
        return self.averaged.module if self._averaged_steps() > 0 else self._backbone()

    def state(self, with_optimizer: bool = True) -> Dict[str, Any]:
        backbone_keys = {"backbone." + k for k in self._backbone().state_dict()}
        extra = {k: v for k, v in self.objective.state_dict().items() if k not in backbone_keys}
        state: Dict[str, Any] = {
            "kind": self.kind,
            "model_config": self.config.to_dict()["model"],
            "labels": dict(self.labels),
            # Everything that reads a checkpoint (predict, --init, probe) takes "model": the averaged network
            # when there is one.
            "model": self.network().state_dict(),
            "extra": extra,
            "step": self.step,
            "best_metric": self.best_metric,
            "config": self.config.to_dict(),
        }
        if self._averaged_steps() > 0:
            state.update(averaged_steps=self._averaged_steps())
            if with_optimizer:  # resume continues training the last weights, not their mean
                state.update(trained_model=self._backbone().state_dict())
        if with_optimizer:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict(), rng=rng_state())
        return state

    def resume(self) -> None:
        """Continue from ``RUN/checkpoints/last.pt``: weights, optimiser, schedule, step and RNG."""
        path = self.run.last_checkpoint
        if not os.path.exists(path):
            raise InputError("has no checkpoints/last.pt to resume from", path=self.run.root,
                             fix="start the run without --resume")
        state = load_checkpoint(path, map_location=self.context.device)
        if state.get("kind") != self.kind:
            raise InputError(f"holds a {state.get('kind')!r} run, not {self.kind!r}", path=path)
        self._backbone().load_state_dict(state.get("trained_model", state["model"]))
        if state.get("averaged_steps"):
            if self.averaged is None:
                raise InputError("holds averaged weights but this run's config has average_weights_from 0",
                                 path=path)
            self.averaged.module.load_state_dict(state["model"])
            self.averaged.n_averaged.fill_(int(state["averaged_steps"]))
        self.objective.load_state_dict(state.get("extra", {}), strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_metric = state.get("best_metric")
        restore_rng_state(state.get("rng"))

    def save(self, kind: str = "last") -> None:
        if not self.context.is_main:
            return
        path = self.run.last_checkpoint if kind == "last" else self.run.best_checkpoint
        save_checkpoint(path, self.state(with_optimizer=(kind == "last")))
        self.events.emit("checkpoint", step=self.step, path=os.path.relpath(path, self.run.root), kind=kind)

    # --- loop -------------------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        return self.context.stop_file_seen(self.run.stop_file)

    def _run_validation(self) -> None:
        # Only rank 0 holds validation cases; every rank meets at the barrier so none runs ahead.
        if self.context.is_main and self.validate is not None:
            backbone = self.network()
            was_training = backbone.training
            backbone.eval()
            with torch.no_grad():
                result = self.validate(backbone, self.step)
            backbone.train(was_training)
            mean = result.get("mean_dice")
            is_best = mean is not None and (self.best_metric is None or mean > self.best_metric)
            if is_best:
                self.best_metric = float(mean)
            self.events.emit("validation", step=self.step, dice=result.get("dice", {}), mean_dice=mean, best=is_best)
            if is_best:
                self.save("best")
        if self.context.distributed:
            import torch.distributed as dist

            dist.barrier()

    def fit(self, resume: bool = False) -> Dict[str, Any]:
        """Train to ``max_steps`` (or a STOP file); returns a summary dict."""
        train = self.train_config
        if resume:
            self.resume()
        model: nn.Module = self.objective
        if self.context.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
            model = DistributedDataParallel(self.objective, device_ids=device_ids)
        sampler = StepSampler(self.step, train.max_steps, train.batch_size * train.grad_accumulation,
                              self.context.rank, self.context.world_size)
        workers = int(train.num_workers)
        loader = DataLoader(self.dataset, batch_size=train.batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=self.collate, pin_memory=self.context.device.type == "cuda",
                            persistent_workers=False, prefetch_factor=2 if workers > 0 else None)
        self.events.emit("start", command=self.config.command, run_dir=self.run.root, total_steps=train.max_steps,
                         start_step=self.step, device=str(self.context.device), world_size=self.context.world_size,
                         labels=[name for key, name in sorted(self.labels.items(), key=lambda kv: int(kv[0]))
                                 if key != "0"])
        from tqdm.auto import tqdm

        bar = tqdm(total=train.max_steps, initial=self.step, desc=self.kind, unit="step", dynamic_ncols=True,
                   disable=not self.context.is_main or self.events.to_stdout)
        started = time.time()
        window_start, window_steps = time.time(), 0
        stopped = False
        self.objective.train()
        batches = iter(loader)
        try:
            while self.step < train.max_steps:
                logs_sum: Dict[str, float] = {}
                loss_sum = 0.0
                self.optimizer.zero_grad(set_to_none=True)
                for micro in range(train.grad_accumulation):
                    batch = next(batches)
                    batch = _to_device(batch, self.context.device)
                    sync = nullcontext()
                    if self.context.distributed and micro < train.grad_accumulation - 1:
                        sync = model.no_sync()
                    with sync:
                        with torch.autocast(self.context.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                            loss, logs = model(batch)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"the loss became {loss.item()} at step {self.step + 1}; "
                                                     "try a lower --lr, or check the input intensities")
                        self.scaler.scale(loss / train.grad_accumulation).backward()
                    loss_sum += float(loss.detach()) / train.grad_accumulation
                    for key, value in logs.items():
                        logs_sum[key] = logs_sum.get(key, 0.0) + float(value) / train.grad_accumulation
                self.scaler.step(self.optimizer)
                self.scaler.update()
                lr = self.optimizer.param_groups[1]["lr"]
                encoder_lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                self.step += 1
                if self.averaged is not None and self.step >= self.average_start:
                    self.averaged.update_parameters(self._backbone())
                window_steps += 1
                elapsed = time.time() - window_start
                rate = window_steps / elapsed if elapsed > 0 else 0.0
                if elapsed > 30:  # a sliding window keeps the rate current
                    window_start, window_steps = time.time(), 0
                eta = (train.max_steps - self.step) / rate if rate > 0 else None
                self.events.emit("step", step=self.step, total=train.max_steps, loss=loss_sum, lr=lr, encoder_lr=encoder_lr,
                                 steps_per_s=rate, eta_s=eta, losses=logs_sum)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.4f}")
                if train.val_every and self.step % train.val_every == 0 and self.step < train.max_steps:
                    self._run_validation()
                if train.checkpoint_every and self.step % train.checkpoint_every == 0 and self.step < train.max_steps:
                    self.save("last")
                if self._stop_requested():
                    stopped = True
                    break
        finally:
            bar.close()
        if not stopped:
            self._run_validation()
        self.save("last")
        if stopped and self.context.is_main and os.path.exists(self.run.stop_file):
            os.remove(self.run.stop_file)
        summary = {"step": self.step, "stopped": stopped, "best_mean_dice": self.best_metric,
                   "seconds": round(time.time() - started, 2)}
        self.events.emit("finished", **summary)
        return summary


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
