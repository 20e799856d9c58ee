"""Typed settings of a run, saved as ``RUN/config.json`` so any result can be rerun.

The dataclasses are plain data: they hold no paths to open files, no tensors
and no behaviour beyond conversion to and from JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

# Model sizes by name. "tiny" exists for tests, "small" for CPUs and demos,
# "base" is the configuration of the UNETR paper (ViT-B/16, feature size 16).
UNETR_SIZES: Dict[str, Dict[str, int]] = {
    "tiny": {"feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 2},
    "small": {"feature_size": 8, "hidden_size": 192, "mlp_dim": 768, "num_heads": 4},
    "base": {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
}
UNET_SIZES: Dict[str, Tuple[int, ...]] = {
    "tiny": (4, 4, 8, 16, 32, 4),
    "small": (16, 16, 32, 64, 128, 16),
    "base": (32, 32, 64, 128, 256, 32),
}


@dataclass
class ModelConfig:
    """Which network, how big, for which patch size and number of classes."""

    architecture: str = "unetr"          # "unetr" or "unet" (the light convolutional U-Net)
    size: str = "base"                   # "tiny" | "small" | "base" (see UNETR_SIZES / UNET_SIZES)
    in_channels: int = 1
    out_channels: int = 2                # classes including background
    patch_size: Tuple[int, int, int] = (96, 96, 96)

    def validate(self) -> None:
        if self.architecture not in ("unetr", "unet"):
            raise ValueError(f"unknown architecture {self.architecture!r}: choose 'unetr' or 'unet'")
        if self.size not in UNETR_SIZES:
            raise ValueError(f"unknown model size {self.size!r}: choose one of {sorted(UNETR_SIZES)}")
        if any(int(p) % 16 for p in self.patch_size):
            raise ValueError(f"patch size {tuple(self.patch_size)} must be a multiple of 16 on every axis "
                             "(both networks downsample four times)")


@dataclass
class PreprocessConfig:
    """How every volume is brought to the network's grid and intensity range."""

    spacing: Tuple[float, float, float] = (1.5, 1.5, 2.0)   # mm, in RAS axis order (x, y, z)
    orientation: str = "RAS"
    # "ct_window" (clip to `window` HU, scale to [0, 1]), "ct_zscore" (clip to `zscore_percentiles` of the
    # training cases' foreground HU, z-score with their mean / std: nnU-Net's CT scheme) or "percentile" (MR).
    # Configs saved before ct_zscore existed say "ct_window" explicitly, so they keep predicting as before.
    intensity: str = "ct_window"
    window: Tuple[float, float] = (-150.0, 250.0)             # HU mapped to [0, 1]
    percentiles: Tuple[float, float] = (0.5, 99.5)            # for intensity = "percentile"
    zscore_percentiles: Tuple[float, float] = (0.5, 99.5)     # for intensity = "ct_zscore"
    # ct_zscore: {"clip_low", "clip_high", "mean", "std", "voxels"} in HU, computed once per run from the
    # training cases (data.preprocess.intensity_statistics) and reused by predict and validation.
    intensity_stats: Optional[Dict[str, float]] = None
    # A training case of another modality than CT (an MR dataset: "modality": {"0": "MR"}) in a CT run is mapped
    # linearly onto HU so that the mean and standard deviation of its labelled organs become these, the CT
    # training cases' ({"mean", "std", "voxels"} in HU, data.preprocess.ct_units); None: no such case.
    ct_units_reference: Optional[Dict[str, float]] = None
    # What a sliding window sees past the ends of a scan thinner than the patch along the body's long axis
    # (the S-I axis of `orientation`): "continue" repeats the end slices, since the body goes on beyond a
    # scan's first and last slice; "air" fills with padding_value (runs saved before this setting existed,
    # which RunConfig.from_dict reads as "air" so they predict as before).  In-plane, past the field of
    # view, is air either way.
    beyond_scan_ends: str = "continue"

    def is_ct(self) -> bool:
        """True when the network's input was CT in HU (so HU rules such as the body mask apply)."""
        return self.intensity in ("ct_window", "ct_zscore")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run."""

    max_steps: int = 2000
    batch_size: int = 2
    grad_accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    val_every: int = 200                 # steps between validations (0: only at the end)
    checkpoint_every: int = 200          # steps between last.pt writes
    amp: bool = True                     # mixed precision, CUDA only
    seed: int = 0
    num_workers: int = 2
    foreground_ratio: float = 0.67       # share of patches centred on a labelled voxel
    sw_overlap: float = 0.25             # sliding-window overlap for validation
    # Supervised augmentation (data/views.py): "intensity" = intensity scale, shift and noise only (runs
    # before the few-label recipe); "spatial" = nnU-Net-like rotation, scaling, elastic, gamma, contrast,
    # blur and low-resolution simulation.
    augmentation: str = "intensity"
    # The spatial augmentation's probability of a rotation and, drawn apart, of a zoom (elastic deformation at
    # half of it): nnU-Net's 0.2, set for datasets of many scans; one scan may want each patch moved more often.
    spatial_prob: float = 0.2
    # Axes of the preprocessing grid (0, 1, 2 = x, y, z) patches are mirrored along in training, each with
    # p = 0.5; the left-right axis only when the targets' left/right pairs can be swapped
    # (data.views.lateral_swap).  predict --tta flips exactly these axes.
    mirror_axes: Tuple[int, ...] = ()
    # Contrast-phase augmentation (data/views.py, contrast_phase_shift): each labelled organ of a training
    # patch, with this probability, has its intensities moved by its own offset of -100..+200 HU, so that
    # a network trained on scans of one contrast phase does not learn the organs' HU (0: off).
    contrast_phase_prob: float = 0.0
    # Gas in hollow organs (data/views.py, hollow_organ_gas): each hollow organ among the targets (stomach,
    # bowel, ...) of a training patch, with this probability, has its most anterior part turned into gas, so
    # that a network trained on a fluid-filled stomach also knows a gas-filled one (0: off).
    hollow_organ_gas_prob: float = 0.0
    # Contrast in vessels (data/views.py, vessel_lumen_contrast): each vessel among the targets (aorta, ...)
    # of a training patch, with this probability, has the blood inside its wall brightened by 50-300 HU, so
    # that a network trained without intravenous contrast also knows a contrast-filled vessel (0: off).
    vessel_contrast_prob: float = 0.0
    # Thin scans (data/views.py, thin_scan_slab): a training patch, with this probability, keeps a slab of
    # its slices around its middle and repeats the slab's end slices to the patch's length, as predict
    # shows a scan thinner than the patch (beyond_scan_ends "continue"), so that such a window is not new
    # to the network (0: off).
    thin_scan_prob: float = 0.0
    # Enhancing tissue (data/views.py, tissue_enhancement): a training patch, with this probability, has its
    # enhancing solid organs among the targets (liver, spleen, ...) and the walls of its hollow ones
    # brightened by one offset of 0-100 HU, as intravenous contrast does, so that a network trained on
    # scans without contrast also knows enhanced organs (0: off).
    tissue_enhancement_prob: float = 0.0
    # Random intensity networks (data/views.py, random_intensity_network, GIN): a training patch, with this
    # probability, is mapped through a shallow network of random weights to new intensities and textures
    # with its edges kept, so that the network learns shapes rather than one scan's contrast (0: off).
    gin_prob: float = 0.0
    # Organs that fill and empty (data/views.py, resize_organs): each stomach, gallbladder or bladder among the
    # targets of a training patch, with this probability, is enlarged or shrunk about its centre by a linear
    # factor of 0.9-1.6, its neighbours pushed aside, so that a network trained on one scan's collapsed
    # stomach also knows a distended one (spatial augmentation only; 0: off).
    organ_filling_prob: float = 0.0
    # The Dice term of the supervised loss (methods/supervised.py): "sample", per patch with background
    # (every run before this option), or "batch", nnU-Net's, summed over the batch, foreground only.
    dice: str = "sample"
    # Weight averaging (engine/trainer.py): from step ceil(average_weights_from x max_steps) on, the network
    # saved, validated and predicted with is the running mean of the weights after every step, not the last
    # step's (stochastic weight averaging; the optimiser keeps training the last weights).  0: off.
    average_weights_from: float = 0.0
    # Fine-tuning that keeps a pre-trained encoder: its parameters train at encoder_lr_scale x lr
    # (None: 0.1 when the encoder was loaded with --init, else 1.0), and not at all for the first
    # freeze_encoder_steps steps.
    encoder_lr_scale: Optional[float] = None
    freeze_encoder_steps: int = 0

    def resolved_encoder_lr_scale(self, encoder_initialised: bool) -> float:
        """The encoder's learning-rate factor: the explicit one, else 0.1 after ``--init``, else 1.0."""
        if self.encoder_lr_scale is not None:
            return float(self.encoder_lr_scale)
        return 0.1 if encoder_initialised else 1.0


@dataclass
class DataConfig:
    """Which datasets, which organs, and which cases train or validate."""

    datasets: List[str] = field(default_factory=list)     # dataset specs as given on the command line
    val_datasets: List[str] = field(default_factory=list)
    unlabeled: List[str] = field(default_factory=list)    # selftrain: dataset specs or folders of images
    labels: List[str] = field(default_factory=list)       # canonical target names, in output order
    labeled_fraction: float = 1.0
    folds: int = 0                        # 0: no k-fold split; validation from val_datasets or a held-out share
    fold: int = 0
    val_fraction: float = 0.2             # share of cases held out when no val dataset and no folds
    cache_dir: Optional[str] = None


@dataclass
class PostprocessConfig:
    """Which cases decide the per-organ largest-connected-component rule (engine/postprocess.py)."""

    # "validation": the validation cases; "training": the training cases (when the only validation
    # case is also the one scored, as in the demo); "off": never keep only the largest component.
    choose_on: str = "validation"


@dataclass
class RunConfig:
    """Everything ``RUN/config.json`` stores."""

    command: str = "finetune"
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    device: str = "auto"
    init_checkpoint: Optional[str] = None
    method: Dict[str, Any] = field(default_factory=dict)  # method-specific settings (pre-training)
    versions: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunConfig":
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            kwargs = {k: v for k, v in values.items() if k in names}
            for f in dataclasses.fields(kind):
                if f.name in kwargs and isinstance(kwargs[f.name], list) and "Tuple" in str(f.type):
                    kwargs[f.name] = tuple(kwargs[f.name])
            return kind(**kwargs)

        return cls(
            command=data.get("command", "finetune"),
            model=build(ModelConfig, data.get("model", {})),
            preprocess=build(PreprocessConfig, {"beyond_scan_ends": "air", **data.get("preprocess", {})}),
            train=build(TrainConfig, data.get("train", {})),
            data=build(DataConfig, data.get("data", {})),
            postprocess=build(PostprocessConfig, data.get("postprocess", {})),
            device=data.get("device", "auto"),
            init_checkpoint=data.get("init_checkpoint"),
            method=dict(data.get("method", {})),
            versions=dict(data.get("versions", {})),
        )


def resumed_config(saved: Dict[str, Any], given: "RunConfig") -> "RunConfig":
    """The settings a ``--resume`` continues with: the run's saved ones, with ``max_steps`` raised to ``given``'s."""
    config = RunConfig.from_dict(saved)
    config.train.max_steps = max(config.train.max_steps, given.train.max_steps)
    return config


def software_versions() -> Dict[str, str]:
    """Versions of the packages a result depends on, for config.json and ``info``."""
    import platform

    import monai
    import numpy
    import SimpleITK
    import torch

    from . import __version__

    # str() matters: torch.__version__ is a str subclass that weights_only loading refuses.
    versions = {
        "contrastiveseg": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
        "cuda": torch.version.cuda,
    }
    return {key: str(value) for key, value in versions.items()}
