"""Engine command lines, built from what the user asked for.

The engine is always run as ``<python> -m ContrastiveSegLib <subcommand> ...``
(inside Slicer ``<python>`` is ``PythonSlicer``).  A training *request* may
need more than one engine run: with a pre-training method the module first
runs ``pretrain`` and then ``finetune --init <pre-training checkpoint>``.
:func:`plan_training` returns those runs in order, each with its own run
folder inside the output folder:

    OUTPUT/
      scene_data/        volumes + segmentations exported from the scene (if any)
      pretrain_mixcl/    (or pretrain_gcl/) the pre-training run
      finetune/          the fine-tuning run: the model to predict with
      selftrain/         the self-training run (method "selftrain")

No Qt and no Slicer here: the functions only build lists of strings.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from .labels import parse_organ_list
from .runfolder import RunStatus, run_status

ENGINE_MODULE = "ContrastiveSegLib"
METHODS = ("none", "mixcl", "gcl", "selftrain")
RECIPES = ("none", "few-label")   # the engine's --recipe (ContrastiveSegLib/recipes.py)
PRETRAINING_METHODS = ("mixcl", "gcl")
MODELS = ("unetr", "unet")
MODEL_SIZES = ("tiny", "small", "base")
DEVICES = ("auto", "cpu", "cuda")
PREDICTION_EXTENSIONS = (".nii.gz", ".nrrd", ".seg.nrrd")
SCENE_DATA_FOLDER = "scene_data"
FINETUNE_FOLDER = "finetune"
SELFTRAIN_FOLDER = "selftrain"


def pretrain_folder_name(method: str) -> str:
    """The run folder name of a pre-training run, e.g. ``pretrain_mixcl``."""
    return f"pretrain_{method}"


@dataclass
class TrainingRequest:
    """What the user asked to train; the GUI and ``logic.train(...)`` both fill one.

    Attributes:
        output_folder: where every run folder of the job goes (created).
        organs: the organs to segment, e.g. ``["liver", "spleen"]`` or ``"liver, spleen"``.
        datasets: labelled dataset specs (folders with a dataset.json, or dataset.json files).
        method: ``none`` (supervised fine-tuning only), ``mixcl`` or ``gcl``
            (contrastive pre-training, then fine-tuning), ``selftrain``
            (self-training with pseudo-labels on unlabelled data).
        pretrain_datasets: extra dataset specs used only for pre-training.
        unlabeled_data: for ``selftrain``: a dataset spec or a folder of images.
        validation_data: a dataset spec held out for validation Dice (fine-tuning).
        init_checkpoint: start fine-tuning / self-training from these weights.
        model, patch_size, max_steps, pretrain_steps, labeled_fraction, device,
        seed: engine settings; None leaves the engine's default.  ``patch_size`` is
            an edge (``64``: a cube) or ``"64,64,32"``.
        spacing: voxel spacing in mm the scans are resampled to: ``3.0`` or ``"1.5,1.5,2"``.
        model_size: ``tiny``, ``small`` or ``base`` (the engine's ``--model-size``); None
            leaves the engine's default. Not in the GUI: for scripts and the self-test.
        recipe: the engine's ``--recipe`` for fine-tuning and self-training (``few-label``:
            the settings measured best with one labelled scan, for the light U-Net); None
            leaves the engine's default (none).
        resume: continue the runs found in the output folder instead of starting over; set
            only by the module's explicit resume action on a chosen earlier job.
    """

    output_folder: str
    organs: Sequence[str]
    datasets: Sequence[str] = field(default_factory=list)
    method: str = "none"
    pretrain_datasets: Sequence[str] = field(default_factory=list)
    unlabeled_data: Optional[str] = None
    validation_data: Optional[str] = None
    init_checkpoint: Optional[str] = None
    model: Optional[str] = None
    model_size: Optional[str] = None
    patch_size: Optional[Union[int, str]] = None
    spacing: Optional[Union[float, str]] = None
    max_steps: Optional[int] = None
    pretrain_steps: Optional[int] = None
    labeled_fraction: Optional[float] = None
    device: str = "auto"
    seed: Optional[int] = None
    recipe: Optional[str] = None
    resume: bool = False

    def organ_names(self) -> List[str]:
        """The organs as canonical names, in the given order."""
        return parse_organ_list(self.organs if not isinstance(self.organs, str) else self.organs)

    def validate(self) -> None:
        """Raise ValueError, with what to do, when the request cannot run."""
        if not self.output_folder or not str(self.output_folder).strip():
            raise ValueError("Choose an output folder: every file of the training goes there.")
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: choose one of {', '.join(METHODS)}.")
        if not self.organ_names():
            raise ValueError("Choose at least one organ to segment (for example: liver, spleen).")
        if not self.datasets:
            raise ValueError("Add at least one labelled dataset (a folder with a dataset.json) "
                             "or a volume + segmentation pair from the scene.")
        if self.method == "selftrain":
            if len(self.datasets) != 1:
                raise ValueError("Self-training takes exactly one labelled dataset; you gave "
                                 f"{len(self.datasets)}. Keep one dataset, or only scene pairs.")
            if not self.unlabeled_data:
                raise ValueError("Self-training needs unlabelled images: choose a folder of images "
                                 "or a dataset.json.")
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"Unknown model {self.model!r}: choose one of {', '.join(MODELS)}.")
        if self.model_size is not None and self.model_size not in MODEL_SIZES:
            raise ValueError(f"Unknown model size {self.model_size!r}: choose one of {', '.join(MODEL_SIZES)}.")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"Unknown recipe {self.recipe!r}: choose one of {', '.join(RECIPES)}.")
        if self.device not in DEVICES:
            raise ValueError(f"Unknown device {self.device!r}: choose one of {', '.join(DEVICES)}.")
        if self.patch_size is not None:
            edges = _numbers(self.patch_size, int)
            if edges is None or len(edges) not in (1, 3) or any(edge < 16 or edge % 16 for edge in edges):
                raise ValueError(f"Patch size {self.patch_size} must be one edge or three, each a multiple of 16 "
                                 "(16, 32, 48, 64, 96, ...).")
        if self.spacing is not None:
            spacing = _numbers(self.spacing, float)
            if spacing is None or len(spacing) not in (1, 3) or any(value <= 0 for value in spacing):
                raise ValueError(f"Spacing {self.spacing} must be one or three positive numbers of mm.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("The number of training steps must be at least 1.")
        if self.pretrain_steps is not None and self.pretrain_steps < 1:
            raise ValueError("The number of pre-training steps must be at least 1.")
        if self.labeled_fraction is not None and not 0.0 < self.labeled_fraction <= 1.0:
            raise ValueError(f"Label fraction {self.labeled_fraction} must be in (0, 1].")


@dataclass
class EngineRun:
    """One engine process of a job.

    Attributes:
        phase: ``pretrain``, ``finetune``, ``selftrain``, ``predict`` or ``evaluate``.
        argv: the full command line (executable first).
        run_dir: the run folder it writes (None for predict / evaluate).
        skip: True when ``resume`` found this run already finished: nothing to do.
    """

    phase: str
    argv: List[str]
    run_dir: Optional[str] = None
    skip: bool = False

    def describe(self) -> str:
        """The command line as one string a user can paste in a terminal."""
        return " ".join(_quote(arg) for arg in self.argv)


def engine_argv(python_executable: str, subcommand: str, arguments: Sequence[str]) -> List[str]:
    """``[python, "-m", "ContrastiveSegLib", subcommand, *arguments]``."""
    return [str(python_executable), "-m", ENGINE_MODULE, subcommand] + [str(a) for a in arguments]


def final_run_dir(request: TrainingRequest) -> str:
    """The run folder of the model a training request produces (the one to predict with)."""
    folder = SELFTRAIN_FOLDER if request.method == "selftrain" else FINETUNE_FOLDER
    return os.path.join(str(request.output_folder), folder)


def plan_training(request: TrainingRequest, python_executable: str) -> List[EngineRun]:
    """The engine runs of a training request, in order.

    With ``request.resume`` each run folder is looked at: a run that finished is
    skipped, one with a checkpoint is continued with ``--resume``, others start
    fresh.
    """
    request.validate()
    output = str(request.output_folder)
    organs = ",".join(request.organ_names())
    runs: List[EngineRun] = []
    init_checkpoint = request.init_checkpoint

    if request.method in PRETRAINING_METHODS:
        run_dir = os.path.join(output, pretrain_folder_name(request.method))
        arguments = ["--method", request.method]
        for spec in list(request.datasets) + [s for s in request.pretrain_datasets if s not in request.datasets]:
            arguments += ["--data", str(spec)]
        arguments += ["--out", run_dir]
        arguments += _model_arguments(request)
        arguments += _optional("--max-steps", request.pretrain_steps)
        arguments += ["--device", request.device]
        arguments += _optional("--seed", request.seed)
        runs.append(_with_resume(EngineRun("pretrain", engine_argv(python_executable, "pretrain", arguments)
                                           + ["--events-stdout"], run_dir), request.resume))
        init_checkpoint = os.path.join(run_dir, "checkpoints", "last.pt")

    if request.method == "selftrain":
        run_dir = final_run_dir(request)
        arguments = ["--labeled", str(request.datasets[0]), "--unlabeled", str(request.unlabeled_data),
                     "--labels", organs, "--out", run_dir]
        arguments += _optional("--init", init_checkpoint)
        arguments += _model_arguments(request)
        arguments += _optional("--max-steps", request.max_steps)
        arguments += _optional("--recipe", request.recipe)
        arguments += ["--device", request.device]
        arguments += _optional("--seed", request.seed)
        runs.append(_with_resume(EngineRun("selftrain", engine_argv(python_executable, "selftrain", arguments)
                                           + ["--events-stdout"], run_dir), request.resume))
        return runs

    run_dir = final_run_dir(request)
    arguments = []
    for spec in request.datasets:
        arguments += ["--data", str(spec)]
    arguments += ["--labels", organs, "--out", run_dir]
    arguments += _model_arguments(request)
    arguments += _optional("--max-steps", request.max_steps)
    arguments += _optional("--recipe", request.recipe)
    arguments += _optional("--labeled-fraction", request.labeled_fraction)
    arguments += ["--device", request.device]
    arguments += _optional("--init", init_checkpoint)
    arguments += _optional("--seed", request.seed)
    arguments += _optional("--val-data", request.validation_data)
    runs.append(_with_resume(EngineRun("finetune", engine_argv(python_executable, "finetune", arguments)
                                       + ["--events-stdout"], run_dir), request.resume))
    return runs


def predict_run(python_executable: str, model_dir: str, image_path: str, output_path: str,
                device: str = "auto", body_mask: bool = True) -> EngineRun:
    """The ``predict`` command: segment ``image_path`` with the model in ``model_dir``.

    ``body_mask=False`` keeps organs the network predicts outside the patient's
    trunk (the engine's ``--no-body-mask``); by default they are background.
    """
    if not str(output_path).lower().endswith(PREDICTION_EXTENSIONS):
        raise ValueError(f"prediction file {output_path} must end with one of {', '.join(PREDICTION_EXTENSIONS)}")
    if device not in DEVICES:
        raise ValueError(f"Unknown device {device!r}: choose one of {', '.join(DEVICES)}.")
    arguments = ["--model", str(model_dir), "--image", str(image_path), "--out", str(output_path),
                 "--device", device] + ([] if body_mask else ["--no-body-mask"])
    return EngineRun("predict", engine_argv(python_executable, "predict", arguments) + ["--events-stdout"])


def evaluate_run(python_executable: str, prediction_path: str, reference_path: str, model_dir: str,
                 metrics_path: Optional[str] = None) -> EngineRun:
    """The ``evaluate`` command: per-organ Dice of a prediction file against a reference file."""
    arguments = ["--pred", str(prediction_path), "--ref", str(reference_path), "--model", str(model_dir)]
    arguments += _optional("--out", metrics_path)
    return EngineRun("evaluate", engine_argv(python_executable, "evaluate", arguments))


def engine_environment(engine_parent: Optional[str], base_pythonpath: Optional[str] = None) -> Dict[str, str]:
    """Environment variables for an engine process.

    ``PYTHONUNBUFFERED=1`` makes each event line arrive as soon as it is printed
    (a pipe would otherwise hold it back), and ``PYTHONPATH`` puts the folder
    holding the engine package first.
    """
    environment = {"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    if engine_parent:
        paths = [str(engine_parent)] + ([base_pythonpath] if base_pythonpath else [])
        environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def find_engine_parent(start_folders: Sequence[str]) -> Optional[str]:
    """The first of ``start_folders`` (or their parents) that holds ``ContrastiveSegLib/__init__.py``.

    Installed, the engine sits next to the module in the scripted-modules folder;
    in a source checkout it is one level up, at the repository top.
    """
    for folder in start_folders:
        for candidate in (Path(folder), Path(folder).parent):
            if (candidate / ENGINE_MODULE / "__init__.py").is_file():
                return str(candidate)
    return None


def _model_arguments(request: TrainingRequest) -> List[str]:
    spacing = None
    if request.spacing is not None:
        values = _numbers(request.spacing, float)
        spacing = ",".join(f"{value:g}" for value in (values * 3 if len(values) == 1 else values))
    patch = None if request.patch_size is None else ",".join(str(v) for v in _numbers(request.patch_size, int))
    return (_optional("--model", request.model) + _optional("--model-size", request.model_size)
            + _optional("--patch", patch) + _optional("--spacing", spacing))


def _numbers(value, kind) -> Optional[list]:
    """``64`` -> ``[64]``, ``"64,64,32"`` -> ``[64, 64, 32]``; None when not numbers."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [kind(value)]
        return [kind(part) for part in str(value).split(",") if part.strip()]
    except (TypeError, ValueError):
        return None


def _optional(flag: str, value) -> List[str]:
    if value is None or value == "":
        return []
    return [flag, str(value)]


def _with_resume(run: EngineRun, resume: bool) -> EngineRun:
    if not resume or run.run_dir is None:
        return run
    status = run_status(run.run_dir)
    if status == RunStatus.FINISHED:
        run.skip = True
    elif status in (RunStatus.STOPPED, RunStatus.INTERRUPTED):
        run.argv.append("--resume")
    return run


def _quote(argument: str) -> str:
    if argument and all(c.isalnum() or c in "-_./:=,+@\\" for c in argument):
        return argument
    return '"' + argument.replace('"', '\\"') + '"'
