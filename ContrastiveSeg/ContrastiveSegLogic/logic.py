"""Training, resuming, segmenting and Dice: the logic behind the GUI, and the Python-console API.

Nothing here blocks Slicer's GUI for long: engine processes run in the
background (:class:`ContrastiveSegJob.process.JobController`), scene pairs are
exported one image or organ per timer tick, the volume to segment is handed to
the engine as its own file when it has one (else written uncompressed), a
process tree is ended on a background thread, and quitting Slicer leaves a
watchdog instead of waiting for the trainer.

Every training request goes to a new job folder in the output root
(``ContrastiveSegJob.jobfolders``); resuming is an explicit call on a chosen
earlier job whose saved settings match.  Closing the scene stops a running
prediction (its result would land in the closed scene) but never a training,
which reads only the files exported when it started.
"""

import datetime
import logging
import os
import time
from typing import Callable, List, Optional, Sequence, Tuple

from ContrastiveSegJob.commands import (
    SCENE_DATA_FOLDER,
    EngineRun,
    TrainingRequest,
    engine_environment,
    plan_training,
    predict_run,
)
from ContrastiveSegJob.datasets import read_dataset_labels
from ContrastiveSegJob.devices import DeviceInfo, parse_probe_output, probe_argv
from ContrastiveSegJob.events import ProgressState
from ContrastiveSegJob.jobfolders import (
    default_output_root,
    is_inside,
    job_status,
    new_job_folder,
    resume_mismatches,
)
from ContrastiveSegJob.labels import parse_organ_list
from ContrastiveSegJob.process import JobController, JobResult, JobStatus
from ContrastiveSegJob.runfolder import (
    RunStatus,
    delete_output_folder,
    folder_size_bytes,
    is_model_folder,
    read_colors,
    read_labels,
    request_stop,
)
from ContrastiveSegMRML import (
    dice_table,
    engine_readable_file,
    import_labelmap_as_segmentation,
    scene_pair_export_steps,
    segment_ids,
    segment_organ,
    write_volume,
)

from .services import LAST_MODEL_KEY, OUTPUT_FOLDER_KEY, LogicServices

TRAINING, PREDICTION = "training", "prediction"
# How long the trainer may take to save its checkpoint after Slicer quit before the watchdog ends it.
QUIT_GRACE_S = 30.0
_SETTING_NAMES = {"patchSize": "patch_size", "spacing": "spacing", "maxSteps": "max_steps",
                  "pretrainSteps": "pretrain_steps", "labeledFraction": "labeled_fraction",
                  "pretrainDatasets": "pretrain_datasets", "unlabeledData": "unlabeled_data",
                  "validationData": "validation_data", "initCheckpoint": "init_checkpoint", "model": "model",
                  "modelSize": "model_size", "device": "device", "seed": "seed", "recipe": "recipe"}


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def finished_message(result: JobResult) -> Tuple[str, Optional[str]]:
    """``(status line, error dialog title or None)`` for a finished job."""
    if result.status == JobStatus.SUCCEEDED:
        return result.message, None
    if result.status in (JobStatus.STOPPED, JobStatus.KILLED):
        return result.message, None
    if result.error_kind == "input":
        return "Failed: see the log.", "Bad input"
    return "Failed: see the log.", ("Segmentation failed" if result.job == PREDICTION else "Training failed")


class JobLogic:
    """Training, prediction and Dice on a scene, with injected collaborators (see :class:`LogicServices`).

    Callbacks (attributes): ``progressCallback(ProgressState)``, ``logCallback(line)``,
    ``finishedCallback(JobResult)`` (``result.job`` is ``"training"`` or ``"prediction"``).
    """

    def __init__(self, services: LogicServices) -> None:
        self.services = services
        options = {} if services.kill_tree is None else {"kill_tree": services.kill_tree}
        self.controller = JobController(services.runner_factory, services.scheduler, **options)
        self.controller.on_progress = self._onProgress
        self.controller.on_log = self._onLog
        self.controller.on_finished = self._onFinished
        self.progressCallback = None
        self.logCallback = None
        self.finishedCallback = None
        self.jobKind: Optional[str] = None
        self.lastResult: Optional[JobResult] = None
        self._afterJob: Optional[Callable[[JobResult], None]] = None
        self._export = None          # the generator of a stepwise scene export in progress
        self._exportThen: Optional[Callable[[], None]] = None
        self._exportCancelled = False
        self._watchedPids = set()

    @property
    def scene(self):
        return self.services.scene

    # -- places ----------------------------------------------------------------------------
    def outputRoot(self) -> str:
        """Where job folders and predictions go: the remembered choice, else ``<Documents>/ContrastiveSeg``.

        A remembered folder inside a temporary folder is not used (models there vanish on reboot).
        """
        chosen = self.services.settings.get(OUTPUT_FOLDER_KEY) or ""
        if chosen and not is_inside(chosen, self.services.temporary_folders):
            return absolute(chosen)
        return default_output_root(self.services.documents_folder)

    def setOutputRoot(self, folder: str) -> None:
        """Remember ``folder`` as the output root (refused inside a temporary folder)."""
        folder = absolute(folder)
        if is_inside(folder, self.services.temporary_folders):
            raise ValueError(f"{folder} is inside a temporary folder, which the system empties (on reboot, or "
                             "Windows Storage Sense): models and exported scans there would vanish. "
                             "Choose a folder in your documents or on a data disk.")
        self.services.settings[OUTPUT_FOLDER_KEY] = folder

    def outputRootUsage(self) -> int:
        """Bytes used by everything in the output root (0 when it does not exist yet)."""
        return folder_size_bytes(self.outputRoot())

    @staticmethod
    def deleteFolder(folder: str) -> int:
        """Delete a job folder or the output root, only if ContrastiveSeg wrote it; returns the bytes freed."""
        return delete_output_folder(folder)

    def lastModelFolder(self) -> str:
        """The model of the last training that succeeded (remembered across scenes and sessions)."""
        folder = self.services.settings.get(LAST_MODEL_KEY) or ""
        return folder if folder and is_model_folder(folder) else ""

    def engineParentFolder(self) -> str:
        return self.services.engine_parent()

    def sampleDatasetFolder(self) -> str:
        """The sample dataset shipped with the engine (a dataset folder)."""
        return os.path.join(self.engineParentFolder(), "ContrastiveSegLib", "sample_data")

    # -- what is running ----------------------------------------------------------------------
    def isRunning(self) -> bool:
        return self.controller.running or self._export is not None

    def availableOrgans(self, datasets: Sequence[str], scenePairs: Sequence[Tuple[object, object]]) -> List[str]:
        """Organs labelled in the datasets and the pairs' segmentations (canonical, sorted)."""
        names = set()
        for spec in datasets:
            names.update(parse_organ_list(list(read_dataset_labels(spec).values())))
        for _volume, segmentation in scenePairs:
            names.update(segment_organ(segmentation, segment_id) for segment_id in segment_ids(segmentation))
        return sorted(names)

    def scenePairsFromIDs(self, pairIDs: Sequence[str]) -> List[Tuple[object, object]]:
        """``["volumeID|segmentationID", ...]`` -> node pairs (pairs whose nodes are gone are skipped)."""
        pairs = []
        for pairID in pairIDs:
            volumeID, _separator, segmentationID = pairID.partition("|")
            volume = self.scene.GetNodeByID(volumeID)
            segmentation = self.scene.GetNodeByID(segmentationID)
            if volume is not None and segmentation is not None:
                pairs.append((volume, segmentation))
        return pairs

    # -- device ---------------------------------------------------------------------------------
    def detectDevice(self, callback: Callable[[DeviceInfo], None], benchmark: Optional[dict] = None) -> None:
        """Find out in a separate process whether PyTorch sees a GPU (Slicer never imports torch);
        ``callback(DeviceInfo)`` is called on the GUI thread when it is known."""
        lines: List[str] = []
        runner = self.services.runner_factory()
        parent = self.engineParentFolder()

        def done(exit_code: int) -> None:
            info = parse_probe_output(lines)
            if exit_code != 0 and info.error is None and info.torch_version is None:
                info.error = f"the probe exited with status {exit_code}"
            callback(info)

        runner.start(probe_argv(self.services.python_executable(), benchmark), parent,
                     engine_environment(parent, self.services.engine_pythonpath), lines.append, done)

    # -- training ----------------------------------------------------------------------------
    def train(self, datasets: Sequence[str] = (), scenePairs: Sequence[Tuple[object, object]] = (),
              organs="", outputFolder: Optional[str] = None, method: str = "none", wait: bool = False,
              resumeFolder: Optional[str] = None, checkDependencies: bool = True, **settings) -> Optional[JobResult]:
        """Train a model in a separate process, in a new job folder of ``outputFolder``.

        Args:
            datasets: dataset folders (with a dataset.json) or dataset.json files.
            scenePairs: ``(volume node, segmentation node)`` pairs, exported into the job folder.
            organs: ``"liver, spleen"`` or ``["liver", "spleen"]``.
            outputFolder: the output root (default: :meth:`outputRoot`).
            method: ``none``, ``mixcl``, ``gcl`` or ``selftrain``.
            wait: block until the job ends and return its :class:`JobResult`.
            resumeFolder: continue this earlier job instead (its settings must match).
            checkDependencies: install missing packages first (one dialog).
            settings: ``model``, ``modelSize``, ``patchSize``, ``spacing``, ``maxSteps``, ``pretrainSteps``,
                ``labeledFraction``, ``device``, ``seed``, ``pretrainDatasets``, ``unlabeledData``,
                ``validationData``, ``initCheckpoint``, ``recipe`` (``few-label`` or ``none``).
        """
        unknown = sorted(set(settings) - set(_SETTING_NAMES))
        if unknown:
            raise TypeError(f"unknown training settings: {', '.join(unknown)}; known: {', '.join(sorted(_SETTING_NAMES))}")
        request = TrainingRequest(output_folder=outputFolder or self.outputRoot(), organs=parse_organ_list(organs),
                                  datasets=list(datasets), method=method,
                                  **{_SETTING_NAMES[key]: value for key, value in settings.items()})
        self.trainRequest(request, scenePairs, resumeFolder=resumeFolder, checkDependencies=checkDependencies)
        return self.wait() if wait else None

    def trainRequest(self, request: TrainingRequest, scenePairs: Sequence[Tuple[object, object]] = (),
                     resumeFolder: Optional[str] = None, checkDependencies: bool = True) -> str:
        """Start a request; ``request.output_folder`` is the output root.  Returns the job folder at once.

        Without ``resumeFolder`` a new job folder is made; with it, that job is
        continued if its saved settings match the request (else ValueError, saying what differs).
        """
        if self.isRunning():
            raise RuntimeError("A job is already running: cancel it or wait for it to finish.")
        self._makePathsAbsolute(request)
        scenePairs = list(scenePairs)
        if scenePairs:
            request.datasets = list(request.datasets) + ["<scene pairs>"]
        request.validate()  # before any folder is made or any scan exported
        request.datasets = [spec for spec in request.datasets if spec != "<scene pairs>"]
        # Asked before any folder is made: declining leaves nothing behind.
        install = self.services.installer.prepare(request.output_folder, True) if checkDependencies else None
        export = None
        if resumeFolder:
            job = absolute(resumeFolder)
            self._prepareResume(request, job, bool(scenePairs))
        else:
            request.resume = False
            job = new_job_folder(request.output_folder, request.organ_names())
            request.output_folder = job
            if scenePairs:
                sceneData = os.path.join(job, SCENE_DATA_FOLDER)
                export = scene_pair_export_steps(self.scene, scenePairs, sceneData, request.organ_names())
                request.datasets = list(request.datasets) + [sceneData]
        self.jobKind = TRAINING
        self._afterJob = None

        def start() -> None:
            self._startRuns(([install] if install else []) + plan_training(request, self.services.python_executable()))

        if export is None:
            start()
        else:
            self._runStepwise(export, start)
        return job

    def resumeMismatches(self, request: TrainingRequest, jobFolder: str, withScenePairs: bool) -> List[str]:
        """Why ``request`` cannot continue the job in ``jobFolder`` (empty list: it can)."""
        self._makePathsAbsolute(request)
        job = absolute(jobFolder)
        if withScenePairs:
            request.datasets = list(request.datasets) + [os.path.join(job, SCENE_DATA_FOLDER)]
        return resume_mismatches(job, request)

    def _prepareResume(self, request: TrainingRequest, job: str, withScenePairs: bool) -> None:
        problems = self.resumeMismatches(request, job, withScenePairs)
        if problems:
            raise ValueError("This run cannot be continued with the current settings:\n- " + "\n- ".join(problems)
                             + "\nStart a new training instead, or change the settings back.")
        if job_status(job, request.method) == RunStatus.FINISHED:
            raise ValueError(f"The run in {job} has already finished: nothing to continue. Its model is in "
                             f"{os.path.join(job, 'selftrain' if request.method == 'selftrain' else 'finetune')}.")
        request.output_folder = job
        request.resume = True

    @staticmethod
    def _makePathsAbsolute(request: TrainingRequest) -> None:
        # The engine runs in the engine's folder: relative paths would point there, not where the user meant.
        request.output_folder = absolute(request.output_folder)
        request.datasets = [absolute(spec) if spec != "<scene pairs>" else spec for spec in request.datasets]
        request.pretrain_datasets = [absolute(spec) for spec in request.pretrain_datasets]
        for name in ("unlabeled_data", "validation_data", "init_checkpoint"):
            if getattr(request, name):
                setattr(request, name, absolute(getattr(request, name)))

    def _runStepwise(self, steps, then: Callable[[], None]) -> None:
        """Run a generator one step per timer tick (the GUI's event loop runs in between), then ``then()``."""
        self._export, self._exportThen, self._exportCancelled = steps, then, False
        self._onLog("[ContrastiveSeg] exporting the scene pairs")
        self.services.scheduler.call_later(0.0, self._exportStep)

    def _exportStep(self) -> None:
        if self._export is None:
            return
        if self._exportCancelled:
            self._export = None
            self._finishWithoutProcess(JobResult(JobStatus.STOPPED, None, "Stopped while exporting the scene data.",
                                                 job=self.jobKind))
            return
        try:
            description = next(self._export)
        except StopIteration:
            self._export, then = None, self._exportThen
            try:
                then()
            except Exception as error:  # called from a timer: report it, nobody else would
                self._finishWithoutProcess(JobResult(JobStatus.FAILED, None, f"Training could not start: {error}",
                                                     job=self.jobKind))
            return
        except Exception as error:
            self._export = None
            self._finishWithoutProcess(JobResult(JobStatus.FAILED, None, f"Exporting the scene data failed: {error}",
                                                 error_kind="input", job=self.jobKind))
            return
        self._onLog(f"[ContrastiveSeg] exported {description}")
        self.services.scheduler.call_later(0.0, self._exportStep)

    def _startRuns(self, runs: List[EngineRun]) -> None:
        parent = self.engineParentFolder()
        self.controller.start(runs, cwd=parent, env=engine_environment(parent, self.services.engine_pythonpath))

    # -- stopping -------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the running job to stop (checkpoint first); a second call ends it at once."""
        if self._export is not None:
            self._exportCancelled = True
            return
        self.controller.cancel()

    def onSceneClosing(self) -> None:
        """The scene is closing: a prediction (whose result would load into the closed scene) and a scene
        export are stopped; a training goes on, it reads only the files exported at its start."""
        if self._export is not None:
            self._exportCancelled = True
            self._exportStep()
        elif self.controller.running and self.jobKind == PREDICTION:
            self._afterJob = None
            self.controller.cancel()

    def onApplicationQuit(self) -> None:
        """Slicer quits: ask the trainer to stop (it saves a checkpoint) and leave a watchdog that ends the
        process tree if it has not exited within ``QUIT_GRACE_S``.  Returns at once."""
        self._export = None
        if not self.controller.running or self.controller.pid() in self._watchedPids:
            return  # nothing running, or already handed to a watchdog (cleanup after aboutToQuit)
        run, pid = self.controller.current_run, self.controller.pid()
        self._watchedPids.add(pid)
        grace = 0.0
        if run is not None and run.run_dir:
            request_stop(run.run_dir)
            grace = QUIT_GRACE_S
        if pid is not None and self.services.start_watchdog is not None:
            self.services.start_watchdog(pid, grace)

    def stopAndWait(self, timeoutSec: float = 30.0) -> Optional[JobResult]:
        """Stop the running job and wait until it has ended (scripts; the GUI never waits for this)."""
        self._export = None
        return self.controller.stop_and_wait(timeoutSec, pump=self.services.pump)

    def wait(self, timeoutSec: Optional[float] = None) -> Optional[JobResult]:
        """Block until the running job ends (scripts and tests), keeping events flowing."""
        deadline = None if timeoutSec is None else time.monotonic() + timeoutSec
        while self.isRunning():
            if self.services.pump is not None:
                self.services.pump()
            else:
                self.controller.poll()
            if not self.isRunning():
                break
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        return self.lastResult

    # -- applying ----------------------------------------------------------------------------
    def predict(self, volumeNode, modelFolder: str, outputSegmentation=None, device: str = "auto",
                wait: bool = True, callback=None, bodyMask: bool = True, checkDependencies: bool = True):
        """Segment ``volumeNode`` with the model in ``modelFolder`` and load the result.

        The engine reads the volume's own file when it has an unchanged one the engine
        can read, else an uncompressed copy; the labelmap is written to
        ``<output root>/predictions/<time>_<volume>/`` (never into the model folder,
        which may be read-only) and loaded as one named, coloured segment per organ.

        Returns:
            With ``wait``: the segmentation node (None if prediction failed or was
            cancelled). Without: None; ``callback(segmentationNode)`` is called later.
        """
        if self.isRunning():
            raise RuntimeError("A job is already running: cancel it or wait for it to finish.")
        if volumeNode is None:
            raise ValueError("Choose a volume to segment.")
        modelFolder = absolute(modelFolder)
        if not is_model_folder(modelFolder):
            raise ValueError(f"{modelFolder} holds no trained model (labels.json and checkpoints/). Choose the "
                             "finetune or selftrain folder of a training output.")
        labels = read_labels(modelFolder)
        colors = read_colors(modelFolder)
        install = self.services.installer.prepare(self.outputRoot(), True) if checkDependencies else None
        safeName = "".join(c if c.isalnum() or c in "-_" else "_" for c in volumeNode.GetName()) or "volume"
        folder = os.path.join(self.outputRoot(), "predictions",
                              f"{datetime.datetime.now():%Y%m%d-%H%M%S}_{safeName}")
        os.makedirs(folder, exist_ok=True)
        outputPath = os.path.join(folder, f"{safeName}_segmentation.nrrd")
        imagePath = engine_readable_file(volumeNode)
        temporaryCopy = None
        if imagePath is None:
            temporaryCopy = imagePath = write_volume(volumeNode, os.path.join(folder, f"{safeName}_input.nrrd"),
                                                     compress=False)
        run = predict_run(self.services.python_executable(), modelFolder, imagePath, outputPath, device, bodyMask)
        loaded = {}

        def load(result: JobResult) -> None:
            segmentation = None
            try:
                if result.status == JobStatus.SUCCEEDED:
                    segmentation = import_labelmap_as_segmentation(
                        self.scene, outputPath, labels, reference_volume=volumeNode, colors=colors,
                        segmentation_node=outputSegmentation,
                        name=self.scene.GenerateUniqueName(f"{volumeNode.GetName()} ContrastiveSeg"))
                    found = [segmentation.GetSegmentation().GetSegment(segment_id).GetName()
                             for segment_id in segment_ids(segmentation)]
                    result.message = f"Loaded {segmentation.GetName()}: {', '.join(found) or 'no organ found'}"
                loaded["node"] = segmentation
            finally:
                if temporaryCopy and os.path.exists(temporaryCopy):
                    os.remove(temporaryCopy)  # the scan is in the scene already: do not keep a copy
            if callback is not None:
                callback(segmentation)

        self.jobKind = PREDICTION
        self._afterJob = load
        self._startRuns(([install] if install else []) + [run])
        if wait:
            self.wait()
            return loaded.get("node")
        return None

    def computeDice(self, segmentationNode, referenceSegmentationNode, tableNode=None, referenceVolume=None):
        """Per-organ Dice as a table node (a row with Dice 0 for each model organ it missed)."""
        if segmentationNode is None or referenceSegmentationNode is None:
            raise ValueError("Choose the segmentation to score and the reference segmentation.")
        return dice_table(self.scene, segmentationNode, referenceSegmentationNode, table_node=tableNode,
                          reference_volume=referenceVolume)

    # -- callbacks -------------------------------------------------------------------------
    def _onProgress(self, state: ProgressState) -> None:
        if self.progressCallback:
            self.progressCallback(state)

    def _onLog(self, line: str) -> None:
        if self.logCallback:
            self.logCallback(line)
        else:
            logging.info(line)

    def _finishWithoutProcess(self, result: JobResult) -> None:
        self._afterJob = None
        self._onFinished(result)

    def _onFinished(self, result: JobResult) -> None:
        afterJob, self._afterJob = self._afterJob, None
        result.job = self.jobKind
        if result.status == JobStatus.FAILED:
            logging.error("ContrastiveSeg job failed: %s", result.message)
        if result.status == JobStatus.SUCCEEDED and self.jobKind == TRAINING:
            if result.run_dir and is_model_folder(result.run_dir):
                self.services.settings[LAST_MODEL_KEY] = result.run_dir
                result.message = f"Done. Model: {result.run_dir}"
        if afterJob is not None:
            try:
                afterJob(result)
            except Exception as error:
                logging.error("ContrastiveSeg: could not load the result: %s", error)
                result = JobResult(JobStatus.FAILED, result.exit_code, f"Could not load the result: {error}",
                                   run_dir=result.run_dir, job=result.job)
        self.lastResult = result
        if self.finishedCallback:
            self.finishedCallback(result)
