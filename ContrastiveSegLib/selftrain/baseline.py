"""Stage 1: the supervised baseline, trained, or taken from ``--init``.

``--init`` with a finetune or selftrain checkpoint of the run's labels *is*
the baseline (validated, and made the run's first model); with a pre-training
checkpoint (or other labels) only its encoder is loaded and the baseline is
trained as ``finetune`` would train it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Dict, Optional, Tuple

import torch

from ..config import RunConfig
from ..engine.checkpoint import load_checkpoint, load_pretrained_weights, save_checkpoint
from ..errors import InputError
from ..finetune import make_validator
from ..models import build_backbone
from .stages import Stage


class BaselineStage:
    """The baseline's ``--init`` handling, as methods of the run (``_SelfTraining``)."""

    def _inspect_init(self) -> Tuple[Optional[str], Optional[Dict[str, torch.Tensor]]]:
        """``("encoder" | "baseline" | None, weights of a baseline)`` for ``--init``."""
        path = self.config.init_checkpoint
        if not path:
            return None, None
        state = load_checkpoint(path)
        kind = state.get("kind")
        if kind in ("finetune", "selftrain") and dict(state.get("labels", {})) == self.labels:
            backbone = build_backbone(self.config.model)
            source = state.get("model_config", {})
            try:
                backbone.load_state_dict(state["model"])
            except RuntimeError:
                raise InputError(
                    f"holds a {source.get('architecture')} {source.get('size')} network for patches of "
                    f"{source.get('patch_size')}, which does not fit this run's {self.config.model.architecture} "
                    f"{self.config.model.size} for {tuple(self.config.model.patch_size)}", path=path,
                    fix="give --model, --model-size and --patch of the run that wrote the checkpoint") from None
            self.init_note = (f"--init {path}: a {kind} model with the same labels; it is the baseline "
                              "(no baseline training)")
            saved = RunConfig.from_dict(state.get("config", {})).preprocess
            if asdict(saved) != asdict(self.config.preprocess):
                self.init_note += ("; note: it was trained with other preprocessing settings "
                                   f"({asdict(saved)}) than this run's ({asdict(self.config.preprocess)})")
            return "baseline", backbone.state_dict()
        # A dry run now, so a checkpoint of another network stops the command before anything is written.
        load_pretrained_weights(build_backbone(self.config.model), path, encoder_only=True)
        if kind in ("finetune", "selftrain"):
            self.init_note = (f"--init {path}: a {kind} model with other labels "
                              f"({', '.join(v for k, v in sorted(state.get('labels', {}).items()) if k != '0')}); "
                              "only its encoder is loaded and a baseline is trained")
        else:
            self.init_note = f"--init {path}: a {kind} checkpoint; its encoder is loaded and a baseline is trained"
        return "encoder", None

    def _baseline_from_init(self, stage: Stage) -> None:
        """The --init model is the baseline: validate it, and make it the run's first best / last model."""
        self.events.emit("stage", stage=stage.name, round=0, step=self.global_step, steps=0, resumed=False)
        mean = None
        if self.context.is_main:
            backbone = build_backbone(self.config.model)
            backbone.load_state_dict(self.init_weights)
            if self.has_validation:
                backbone = backbone.to(self.context.device).eval()
                validate = make_validator(self.prepared_val, self.targets, self.config.model.patch_size,
                                          self.config.train.sw_overlap)
                with torch.no_grad():
                    result = validate(backbone, 0)
                mean = result.get("mean_dice")
                self.events.emit("validation", step=self.global_step, dice=result.get("dice", {}), mean_dice=mean,
                                 best=mean is not None, stage=stage.name, round=0)
            weights = {k: v.detach().cpu() for k, v in self.init_weights.items()}
            save_checkpoint(self.run.last_checkpoint, self._model_state(weights, mean))
            self.events.emit("checkpoint", step=self.global_step, path="checkpoints/last.pt", kind="last",
                             stage=stage.name, round=0)
            if mean is not None:
                save_checkpoint(self.run.best_checkpoint, self._model_state(weights, mean))
                self.events.emit("checkpoint", step=self.global_step, path="checkpoints/best.pt", kind="best",
                                 stage=stage.name, round=0)
        if mean is not None:
            self.best_mean_dice, self.best_stage = float(mean), stage.name
        self._barrier()
