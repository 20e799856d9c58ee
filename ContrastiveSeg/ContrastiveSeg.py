"""ContrastiveSeg: train CT organ segmentation from a few labelled scans, watch it, stop it, use it.

The module is the GUI of the ``ContrastiveSegLib`` engine.  Training and
prediction always run in a separate ``PythonSlicer`` process, so Slicer never
freezes; the module follows the engine's JSON-lines events (progress, loss,
validation Dice) and loads results as named, coloured segmentations.

Code layout (everything but the GUI wiring lives in packages next to this file):

* ``ContrastiveSegJob``: Qt-free: engine command lines, event parsing, run
  folders, the job controller with its cancel sequence (tested in CI);
* ``ContrastiveSegMRML``: labelmap <-> segmentation, Dice tables, scene export
  (tested in CI against slicer-core);
* ``ContrastiveSegSlicer``: process runners, dependency installation, sample data.

Written for Python 3.9 (Slicer 5.8) and later.
"""

import logging
import os
import sys
import tempfile
from typing import Annotated, List, Optional, Sequence, Tuple

import qt
import slicer
import vtk
from ContrastiveSegJob.commands import (
    METHODS,
    PRETRAINING_METHODS,
    SCENE_DATA_FOLDER,
    TrainingRequest,
    engine_environment,
    final_run_dir,
    find_engine_parent,
    plan_training,
    predict_run,
    pretrain_folder_name,
)
from ContrastiveSegJob.datasets import read_dataset_labels
from ContrastiveSegJob.events import ProgressState, format_duration
from ContrastiveSegJob.labels import parse_organ_list
from ContrastiveSegJob.process import JobController, JobResult, JobStatus
from ContrastiveSegJob.runfolder import (
    RunStatus,
    delete_output_folder,
    folder_size_bytes,
    format_size,
    is_model_folder,
    read_colors,
    read_labels,
    run_status,
)
from ContrastiveSegMRML import (
    dice_table,
    export_scene_pairs_to_dataset,
    format_dice,
    import_labelmap_as_segmentation,
    segment_names,
    write_volume,
)
from ContrastiveSegSlicer.dependencies import DependencyError, ensure_all
from ContrastiveSegSlicer.runners import QtScheduler, default_runner_factory, python_slicer_executable
from ContrastiveSegSlicer.sampledata import load_sample_data, register_sample_data
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def methodDescription(method: str) -> str:
    """One sentence on what a training method does, for the GUI."""
    descriptions = {
        "none": _("Supervised fine-tuning only: the network learns from the labelled scans."),
        "mixcl": _("MixCL: contrastive pre-training on all labelled datasets (identity, label and "
                   "reconstruction consistency), then fine-tuning. Datasets may label different organs."),
        "gcl": _("GCL: global + local contrastive pre-training with gradient surgery, then fine-tuning."),
        "selftrain": _("Self-training: fine-tune, pseudo-label the unlabelled scans, train again on both."),
    }
    return descriptions.get(method, "")


#
# ContrastiveSeg
#


class ContrastiveSeg(ScriptedLoadableModule):
    """Module description shown in Slicer (Help & Acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ContrastiveSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ContrastiveSeg contributors"]
        self.parent.helpText = _(
            "Train a CT organ segmentation network from a few labelled scans (supervised fine-tuning, or "
            "contrastive pre-training with MixCL / GCL, or self-training), watch its progress, cancel it, and "
            "segment volumes with the result, with per-organ Dice against a reference. Training runs in a "
            "separate process: Slicer stays responsive. "
            "See <a href=\"https://github.com/ContrastiveSeg/SlicerContrastiveSeg\">the documentation</a>.")
        self.parent.acknowledgementText = _(
            "Sample data: TotalSegmentator test data (Wasserthal et al., Radiology: AI 2023), Apache 2.0. "
            "Methods: MixCL, GCL and self-training with pseudo-labels; see the README for references.")
        # Sample data is registered once the application has started (the Sample Data module must exist).
        slicer.app.connect("startupCompleted()", _registerSampleData)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def _registerSampleData():
    try:
        register_sample_data(MODULE_DIR)
    except Exception as error:  # sample data is a convenience: never break startup for it
        logging.warning("ContrastiveSeg: could not register sample data: %s", error)


#
# ContrastiveSegParameterNode
#


@parameterNodeWrapper
class ContrastiveSegParameterNode:
    """The module's state, saved with the scene. Fields bound to widgets carry the same name
    as the widget's ``SlicerParameterName`` property in ``Resources/UI/ContrastiveSeg.ui``."""

    # training data (lists are edited by the widget, not bound to a single widget)
    datasetPaths: List[str]
    pretrainDatasetPaths: List[str]
    scenePairIDs: List[str]
    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentation: vtkMRMLSegmentationNode
    organs: str = ""
    # method
    method: Annotated[str, Choice(list(METHODS))] = "none"
    pretrainSteps: Annotated[int, WithinRange(1, 10000000)] = 2000
    unlabeledPath: str = ""
    # settings
    maxSteps: Annotated[int, WithinRange(1, 10000000)] = 2000
    patchSize: Annotated[int, WithinRange(16, 512)] = 96
    labeledFraction: Annotated[float, WithinRange(0.01, 1.0)] = 1.0
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    model: Annotated[str, Choice(["unetr", "unet"])] = "unetr"
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    validationPath: str = ""
    outputFolder: str = ""
    resume: bool = False
    # applying a model
    modelFolder: str = ""
    predictVolume: vtkMRMLScalarVolumeNode
    bodyMask: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    referenceSegmentation: vtkMRMLSegmentationNode


#
# ContrastiveSegWidget
#


class ContrastiveSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only: every action calls the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingOrganList = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ContrastiveSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ContrastiveSegLogic()
        self.logic.progressCallback = self.onProgress
        self.logic.logCallback = self.onLog
        self.logic.finishedCallback = self.onJobFinished

        self.ui.validationTableWidget.setColumnCount(2)
        self.ui.validationTableWidget.setHorizontalHeaderLabels([_("Organ"), _("Dice")])
        self.ui.validationTableWidget.horizontalHeader().setStretchLastSection(True)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.onApplicationQuit)

        self.ui.addDatasetFolderButton.connect("clicked(bool)", self.onAddDatasetFolder)
        self.ui.addDatasetFileButton.connect("clicked(bool)", self.onAddDatasetFile)
        self.ui.addSampleDatasetButton.connect("clicked(bool)", self.onAddSampleDataset)
        self.ui.removeDatasetButton.connect("clicked(bool)", self.onRemoveDataset)
        self.ui.addScenePairButton.connect("clicked(bool)", self.onAddScenePair)
        self.ui.removeScenePairButton.connect("clicked(bool)", self.onRemoveScenePair)
        self.ui.refreshOrgansButton.connect("clicked(bool)", self.onRefreshOrgans)
        self.ui.organListWidget.connect("itemChanged(QListWidgetItem*)", self.onOrganItemChanged)
        self.ui.addPretrainDatasetButton.connect("clicked(bool)", self.onAddPretrainDataset)
        self.ui.removePretrainDatasetButton.connect("clicked(bool)", self.onRemovePretrainDataset)
        self.ui.browseUnlabeledButton.connect("clicked(bool)", self.onBrowseUnlabeled)
        self.ui.browseValidationButton.connect("clicked(bool)", self.onBrowseValidation)
        self.ui.browseOutputFolderButton.connect("clicked(bool)", self.onBrowseOutputFolder)
        self.ui.browseModelFolderButton.connect("clicked(bool)", self.onBrowseModelFolder)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.openOutputFolderButton.connect("clicked(bool)", self.onOpenOutputFolder)
        self.ui.deleteOutputFolderButton.connect("clicked(bool)", self.onDeleteOutputFolder)
        self.ui.predictButton.connect("clicked(bool)", self.onPredict)
        self.ui.computeDiceButton.connect("clicked(bool)", self.onComputeDice)

        self.initializeParameterNode()
        self.updateRunButtons()

    def cleanup(self) -> None:
        """Module closing (application exit or reload): stop a running job, drop observers."""
        self.removeObservers()
        if self.logic is not None and self.logic.isRunning():
            self.logic.stopAndWait()
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # Training goes on while the user works in other modules; only the GUI binding is dropped.
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic is not None and self.logic.isRunning():
            self.onLog(_("[ContrastiveSeg] the scene is closing: stopping the running job"))
            self.logic.stopAndWait()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onApplicationQuit(self) -> None:
        if self.logic is not None and self.logic.isRunning():
            self.logic.stopAndWait(timeoutSec=10.0)

    def onReload(self) -> None:
        """Reload the helper packages too (they are imported by this file, so dropping them from
        ``sys.modules`` makes the reload of this file import their current code)."""
        if self.logic is not None and self.logic.isRunning():
            self.logic.stopAndWait()
        for name in list(sys.modules):
            if name.split(".")[0] in ("ContrastiveSegJob", "ContrastiveSegMRML", "ContrastiveSegSlicer"):
                del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # -- parameter node ------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.trainingVolume:
            self._parameterNode.trainingVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.predictVolume:
            self._parameterNode.predictVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.outputFolder:
            self._parameterNode.outputFolder = self.logic.defaultOutputFolder()

    def setParameterNode(self, inputParameterNode: Optional["ContrastiveSegParameterNode"]) -> None:
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        self._fillList(self.ui.datasetListWidget, list(self._parameterNode.datasetPaths))
        self._fillList(self.ui.pretrainDatasetListWidget, list(self._parameterNode.pretrainDatasetPaths))
        self._fillList(self.ui.scenePairListWidget,
                       [self._pairLabel(pair) for pair in self.logic.scenePairsFromIDs(self._parameterNode.scenePairIDs)])
        method = self._parameterNode.method
        self.ui.methodDescriptionLabel.text = methodDescription(method)
        pretraining = method in PRETRAINING_METHODS
        self.ui.pretrainDatasetsWidget.setEnabled(pretraining)
        self.ui.pretrainStepsSpinBox.setEnabled(pretraining)
        self.ui.unlabeledWidget.setEnabled(method == "selftrain")
        self.ui.labeledFractionSpinBox.setEnabled(method != "selftrain")
        self._syncOrganChecks()
        self.updateRunButtons()

    @staticmethod
    def _fillList(listWidget, texts: Sequence[str]) -> None:
        if [listWidget.item(row).text() for row in range(listWidget.count)] == list(texts):
            return
        listWidget.clear()
        for text in texts:
            listWidget.addItem(text)

    @staticmethod
    def _pairLabel(pair) -> str:
        volume, segmentation = pair
        return f"{volume.GetName()} + {segmentation.GetName()}"

    def updateRunButtons(self) -> None:
        running = self.logic is not None and self.logic.isRunning()
        node = self._parameterNode
        hasData = node is not None and (bool(node.datasetPaths) or bool(node.scenePairIDs) or
                                        (node.trainingVolume is not None and node.trainingSegmentation is not None))
        hasOrgans = node is not None and bool(parse_organ_list(node.organs))
        self.ui.startButton.enabled = not running and hasData and hasOrgans and node is not None and bool(node.outputFolder)
        self.ui.startButton.toolTip = _("Start training") if self.ui.startButton.enabled else _(
            "Add training data, choose organs and an output folder first")
        self.ui.cancelButton.enabled = running
        self.ui.cancelButton.text = _("Stop now") if running and self.logic.controller.stopping else _("Cancel")
        canPredict = node is not None and node.predictVolume is not None and bool(node.modelFolder) and \
            is_model_folder(node.modelFolder)
        self.ui.predictButton.enabled = not running and canPredict
        self.ui.computeDiceButton.enabled = node is not None and node.outputSegmentation is not None and \
            node.referenceSegmentation is not None
        outputExists = node is not None and bool(node.outputFolder) and os.path.isdir(node.outputFolder)
        self.ui.openOutputFolderButton.enabled = outputExists
        self.ui.deleteOutputFolderButton.enabled = outputExists and not running

    # -- training data -------------------------------------------------------------------
    def onAddDatasetFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a dataset folder (with a dataset.json)"))
        if folder:
            self._addPath(self._parameterNode.datasetPaths, folder)

    def onAddDatasetFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Choose a dataset.json"), "", "dataset.json (*.json)")
        if path:
            self._addPath(self._parameterNode.datasetPaths, path)

    def onAddSampleDataset(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The sample data was not found."), waitCursor=True):
            self._addPath(self._parameterNode.datasetPaths, self.logic.sampleDatasetFolder())
            if not self._parameterNode.organs:
                self._parameterNode.organs = "liver, spleen"
            self.onRefreshOrgans()

    def onRemoveDataset(self) -> None:
        self._removeSelected(self.ui.datasetListWidget, self._parameterNode.datasetPaths)

    def onAddPretrainDataset(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a pre-training dataset folder"))
        if folder:
            self._addPath(self._parameterNode.pretrainDatasetPaths, folder)

    def onRemovePretrainDataset(self) -> None:
        self._removeSelected(self.ui.pretrainDatasetListWidget, self._parameterNode.pretrainDatasetPaths)

    def _addPath(self, observedList, path: str) -> None:
        with slicer.util.tryWithErrorDisplay(_("This is not a usable dataset."), waitCursor=True):
            read_dataset_labels(path)  # tells the user now, not at training time, if it is unusable
            if path not in observedList:
                observedList.append(path)

    @staticmethod
    def _removeSelected(listWidget, observedList) -> None:
        row = listWidget.currentRow
        if 0 <= row < len(observedList):
            del observedList[row]

    def onAddScenePair(self) -> None:
        volume, segmentation = self._parameterNode.trainingVolume, self._parameterNode.trainingSegmentation
        if volume is None or segmentation is None:
            slicer.util.errorDisplay(_("Choose a volume and its segmentation first."))
            return
        pairID = f"{volume.GetID()}|{segmentation.GetID()}"
        if pairID not in self._parameterNode.scenePairIDs:
            self._parameterNode.scenePairIDs.append(pairID)
        self.onRefreshOrgans()

    def onRemoveScenePair(self) -> None:
        self._removeSelected(self.ui.scenePairListWidget, self._parameterNode.scenePairIDs)

    def onRefreshOrgans(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not list the organs of the training data."), waitCursor=True):
            organs = self.logic.availableOrgans(self._parameterNode.datasetPaths, self._trainingPairs())
            self._updatingOrganList = True
            try:
                self.ui.organListWidget.clear()
                for organ in organs:
                    item = qt.QListWidgetItem(organ)
                    item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                    item.setCheckState(qt.Qt.Unchecked)
                    self.ui.organListWidget.addItem(item)
            finally:
                self._updatingOrganList = False
            self._syncOrganChecks()

    def _syncOrganChecks(self) -> None:
        if self._parameterNode is None:
            return
        chosen = set(parse_organ_list(self._parameterNode.organs))
        self._updatingOrganList = True
        try:
            for row in range(self.ui.organListWidget.count):
                item = self.ui.organListWidget.item(row)
                state = qt.Qt.Checked if item.text() in chosen else qt.Qt.Unchecked
                if item.checkState() != state:
                    item.setCheckState(state)
        finally:
            self._updatingOrganList = False

    def onOrganItemChanged(self, item) -> None:
        if self._updatingOrganList or self._parameterNode is None:
            return
        organs = parse_organ_list(self._parameterNode.organs)
        if item.checkState() == qt.Qt.Checked and item.text() not in organs:
            organs.append(item.text())
        elif item.checkState() != qt.Qt.Checked and item.text() in organs:
            organs.remove(item.text())
        self._parameterNode.organs = ", ".join(organs)

    def _trainingPairs(self) -> List[Tuple[object, object]]:
        pairs = self.logic.scenePairsFromIDs(self._parameterNode.scenePairIDs)
        if not pairs and self._parameterNode.trainingVolume and self._parameterNode.trainingSegmentation:
            pairs = [(self._parameterNode.trainingVolume, self._parameterNode.trainingSegmentation)]
        return pairs

    # -- folders -------------------------------------------------------------------------
    def _chooseFolder(self, title: str, current: str) -> str:
        return qt.QFileDialog.getExistingDirectory(self.parent, title, current or "")

    def onBrowseUnlabeled(self) -> None:
        folder = self._chooseFolder(_("Choose the folder of unlabelled scans"), self._parameterNode.unlabeledPath)
        if folder:
            self._parameterNode.unlabeledPath = folder

    def onBrowseValidation(self) -> None:
        folder = self._chooseFolder(_("Choose a validation dataset folder"), self._parameterNode.validationPath)
        if folder:
            self._parameterNode.validationPath = folder

    def onBrowseOutputFolder(self) -> None:
        folder = self._chooseFolder(_("Choose the output folder"), self._parameterNode.outputFolder)
        if folder:
            self._parameterNode.outputFolder = folder

    def onBrowseModelFolder(self) -> None:
        folder = self._chooseFolder(_("Choose a trained model folder (finetune or selftrain)"),
                                    self._parameterNode.modelFolder)
        if folder:
            self._parameterNode.modelFolder = folder

    def onOpenOutputFolder(self) -> None:
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self._parameterNode.outputFolder))

    def onDeleteOutputFolder(self) -> None:
        folder = self._parameterNode.outputFolder
        size = format_size(folder_size_bytes(folder))
        if not slicer.util.confirmYesNoDisplay(
                _("Delete {folder} ({size}) with every checkpoint, log, exported scan and prediction in it? "
                  "This cannot be undone.").format(folder=folder, size=size)):
            return
        with slicer.util.tryWithErrorDisplay(_("The output folder was not deleted."), waitCursor=True):
            delete_output_folder(folder)
            self.onLog(_("[ContrastiveSeg] deleted {folder} ({size})").format(folder=folder, size=size))
        self.updateRunButtons()

    # -- training ------------------------------------------------------------------------
    def onStart(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            request = self.logic.requestFromParameterNode(node)
            if not node.resume and self.logic.outputHasRuns(request):
                answer = slicer.util.confirmYesNoDisplay(
                    _("The output folder already holds a training run. Continue it (resume)?\n\n"
                      "Yes: continue from its last checkpoint. No: choose another output folder first."))
                if not answer:
                    return
                node.resume = True
                request.resume = True
            self.logic.ensureDependencies(ask=True)
            self.ui.logTextEdit.clear()
            self.ui.validationTableWidget.setRowCount(0)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self.logic.trainRequest(request, scenePairs=self._trainingPairs())
        self.updateRunButtons()

    def onCancel(self) -> None:
        self.logic.cancel()
        self.ui.statusLabel.text = _("Stopping: waiting for the checkpoint to be saved...")
        self.updateRunButtons()

    def onProgress(self, state: ProgressState) -> None:
        self.ui.progressBar.value = state.percent()
        self.ui.statusLabel.text = state.status_text()
        if state.loss is not None:
            details = ", ".join(f"{name} {value:.4g}" for name, value in sorted(state.losses.items()))
            self.ui.lossLabel.text = f"{state.loss:.4g}" + (f" ({details})" if details else "")
        rows = state.dice_rows()
        table = self.ui.validationTableWidget
        table.setRowCount(len(rows) + (1 if state.mean_dice is not None else 0))
        for index, row in enumerate(rows):
            table.setItem(index, 0, qt.QTableWidgetItem(row["organ"]))
            table.setItem(index, 1, qt.QTableWidgetItem(format_dice(row["dice"])))
        if state.mean_dice is not None:
            best = "" if state.best_mean_dice is None else _(" (best {best})").format(best=format_dice(state.best_mean_dice))
            table.setItem(len(rows), 0, qt.QTableWidgetItem(_("mean")))
            table.setItem(len(rows), 1, qt.QTableWidgetItem(format_dice(state.mean_dice) + best))
        self.updateRunButtons()

    def onLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def onJobFinished(self, result: JobResult) -> None:
        self.updateRunButtons()
        if result.status == JobStatus.SUCCEEDED:
            self.ui.progressBar.value = 100
            if result.run_dir and is_model_folder(result.run_dir) and self._parameterNode is not None:
                self._parameterNode.modelFolder = result.run_dir
            self.ui.statusLabel.text = _("Done. Model: {folder}").format(folder=result.run_dir or "")
        elif result.status in (JobStatus.STOPPED, JobStatus.KILLED):
            self.ui.statusLabel.text = result.message
        else:
            self.ui.statusLabel.text = _("Failed: see the log.")
            self.ui.logCollapsibleButton.collapsed = False
            title = _("Bad input") if result.error_kind == "input" else _("Training failed")
            slicer.util.errorDisplay(result.message, windowTitle=title)

    # -- applying ------------------------------------------------------------------------
    def onPredict(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            self.logic.ensureDependencies(ask=True)
            self.ui.statusLabel.text = _("Segmenting {volume}...").format(volume=node.predictVolume.GetName())
            self.logic.predict(node.predictVolume, node.modelFolder, device=node.device, wait=False,
                               callback=self.onPredictionLoaded, bodyMask=node.bodyMask)
        self.updateRunButtons()

    def onPredictionLoaded(self, segmentationNode) -> None:
        if segmentationNode is None:
            return
        self._parameterNode.outputSegmentation = segmentationNode
        self.ui.statusLabel.text = _("Loaded {name}: {organs}").format(
            name=segmentationNode.GetName(), organs=", ".join(segment_names(segmentationNode).values()) or _("no organ found"))
        if self._parameterNode.referenceSegmentation is not None:
            self.onComputeDice()

    def onComputeDice(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Dice could not be computed."), waitCursor=True):
            table = self.logic.computeDice(node.outputSegmentation, node.referenceSegmentation)
            self.ui.diceTableView.setMRMLTableNode(table)


#
# ContrastiveSegLogic
#


class ContrastiveSegLogic(ScriptedLoadableModuleLogic):
    """Training, prediction and Dice, usable from the GUI and from the Python console.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("ContrastiveSeg")
        volume, segmentation = logic.loadSampleData()
        result = logic.train(scenePairs=[(volume, segmentation)], organs="liver, spleen",
                             outputFolder="/tmp/cs", model="unet", patchSize=32, maxSteps=20,
                             device="cpu", wait=True)
        prediction = logic.predict(volume, result.run_dir, wait=True)
        table = logic.computeDice(prediction, segmentation)

    Args:
        runnerFactory: makes process runners (default: ``launchConsoleProcess`` on
            Slicer 5.12+, ``QProcess`` before).
        scheduler: timers for the cancel sequence (default: ``QTimer``).
    """

    def __init__(self, runnerFactory=None, scheduler=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.controller = JobController(runnerFactory or default_runner_factory(), scheduler or QtScheduler())
        self.controller.on_progress = self._onProgress
        self.controller.on_log = self._onLog
        self.controller.on_finished = self._onFinished
        self.progressCallback = None
        self.logCallback = None
        self.finishedCallback = None
        self._afterJob = None

    def getParameterNode(self) -> "ContrastiveSegParameterNode":
        return ContrastiveSegParameterNode(super().getParameterNode())

    # -- places ----------------------------------------------------------------------------
    @staticmethod
    def resourcePath(name: str) -> str:
        return os.path.join(MODULE_DIR, "Resources", name)

    @staticmethod
    def engineParentFolder() -> str:
        """The folder holding the ``ContrastiveSegLib`` engine package."""
        folder = find_engine_parent([MODULE_DIR])
        if folder is None:
            raise RuntimeError(_("The ContrastiveSegLib engine was not found next to the module. "
                                 "Reinstall the ContrastiveSeg extension."))
        return folder

    def sampleDatasetFolder(self) -> str:
        """The sample dataset shipped with the engine (a dataset folder)."""
        return os.path.join(self.engineParentFolder(), "ContrastiveSegLib", "sample_data")

    @staticmethod
    def defaultOutputFolder() -> str:
        """A writable default: ``<Slicer's temporary folder>/ContrastiveSeg``."""
        base = slicer.app.temporaryPath if hasattr(slicer, "app") else tempfile.gettempdir()
        return os.path.join(base, "ContrastiveSeg")

    def loadSampleData(self):
        """Load the sample CT and its organ segmentation into the scene; returns (volume, segmentation)."""
        return load_sample_data(MODULE_DIR, slicer.mrmlScene)

    # -- dependencies ------------------------------------------------------------------------
    def ensureDependencies(self, ask: bool = True) -> None:
        """Install torch (PyTorch extension) and the engine's packages if missing, asking first."""
        try:
            ensure_all(self.resourcePath("requirements.txt"), ask)
        except DependencyError:
            raise
        except Exception as error:
            raise DependencyError(_("Installing dependencies failed: {error}").format(error=error)) from error

    # -- training ----------------------------------------------------------------------------
    def isRunning(self) -> bool:
        return self.controller.running

    @staticmethod
    def scenePairsFromIDs(pairIDs: Sequence[str]) -> List[Tuple[object, object]]:
        """``["volumeID|segmentationID", ...]`` -> node pairs (pairs whose nodes are gone are skipped)."""
        pairs = []
        for pairID in pairIDs:
            volumeID, _separator, segmentationID = pairID.partition("|")
            volume = slicer.mrmlScene.GetNodeByID(volumeID)
            segmentation = slicer.mrmlScene.GetNodeByID(segmentationID)
            if volume is not None and segmentation is not None:
                pairs.append((volume, segmentation))
        return pairs

    @staticmethod
    def availableOrgans(datasets: Sequence[str], scenePairs: Sequence[Tuple[object, object]]) -> List[str]:
        """Organ names labelled in the datasets and the pairs' segmentations (canonical, sorted)."""
        names = set()
        for spec in datasets:
            names.update(parse_organ_list(list(read_dataset_labels(spec).values())))
        for _volume, segmentation in scenePairs:
            names.update(parse_organ_list(list(segment_names(segmentation).values())))
        return sorted(names)

    def requestFromParameterNode(self, node: "ContrastiveSegParameterNode") -> TrainingRequest:
        """The training request the GUI's settings describe (scene pairs are added at start)."""
        pretraining = node.method in PRETRAINING_METHODS
        return TrainingRequest(
            output_folder=node.outputFolder,
            organs=parse_organ_list(node.organs),
            datasets=list(node.datasetPaths),
            method=node.method,
            pretrain_datasets=list(node.pretrainDatasetPaths) if pretraining else [],
            unlabeled_data=node.unlabeledPath or None,
            validation_data=node.validationPath or None,
            model=node.model,
            patch_size=node.patchSize,
            max_steps=node.maxSteps,
            pretrain_steps=node.pretrainSteps if pretraining else None,
            labeled_fraction=node.labeledFraction if node.method != "selftrain" else None,
            device=node.device,
            seed=node.seed,
            resume=node.resume,
        )

    @staticmethod
    def outputHasRuns(request: TrainingRequest) -> bool:
        """Whether the output folder already holds a run this request would overwrite."""
        runDirs = [final_run_dir(request)]
        if request.method in PRETRAINING_METHODS:
            runDirs.append(os.path.join(str(request.output_folder), pretrain_folder_name(request.method)))
        return any(run_status(runDir) != RunStatus.NONE for runDir in runDirs)

    def train(self, datasets: Sequence[str] = (), scenePairs: Sequence[Tuple[object, object]] = (),
              organs="", outputFolder: str = "", method: str = "none", wait: bool = False,
              checkDependencies: bool = True, **settings) -> Optional[JobResult]:
        """Train a model in a separate process.

        Args:
            datasets: dataset folders (with a dataset.json) or dataset.json files.
            scenePairs: ``(volume node, segmentation node)`` pairs of the scene; exported to
                ``<outputFolder>/scene_data`` as one more dataset.
            organs: ``"liver, spleen"`` or ``["liver", "spleen"]``.
            outputFolder: where every run folder goes.
            method: ``none``, ``mixcl``, ``gcl`` or ``selftrain``.
            wait: block until the job ends and return its :class:`JobResult`
                (the GUI stays responsive: events are processed while waiting).
            checkDependencies: install missing dependencies first (asking the user).
            settings: more :class:`ContrastiveSegJob.commands.TrainingRequest` fields:
                ``model``, ``modelSize``, ``patchSize``, ``maxSteps``, ``pretrainSteps``, ``labeledFraction``,
                ``device``, ``seed``, ``resume``, ``pretrainDatasets``, ``unlabeledData``,
                ``validationData``, ``initCheckpoint``.

        Returns:
            The result if ``wait``, else None (follow ``progressCallback`` / ``finishedCallback``).
        """
        names = {"patchSize": "patch_size", "maxSteps": "max_steps", "pretrainSteps": "pretrain_steps",
                 "labeledFraction": "labeled_fraction", "pretrainDatasets": "pretrain_datasets",
                 "unlabeledData": "unlabeled_data", "validationData": "validation_data",
                 "initCheckpoint": "init_checkpoint", "model": "model", "modelSize": "model_size",
                 "device": "device", "seed": "seed", "resume": "resume"}
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"unknown training settings: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        request = TrainingRequest(output_folder=outputFolder, organs=parse_organ_list(organs),
                                  datasets=list(datasets), method=method,
                                  **{names[key]: value for key, value in settings.items()})
        if checkDependencies:
            self.ensureDependencies(ask=True)
        self.trainRequest(request, scenePairs)
        if wait:
            return self.wait()
        return None

    def trainRequest(self, request: TrainingRequest, scenePairs: Sequence[Tuple[object, object]] = ()) -> None:
        """Start a :class:`TrainingRequest` (scene pairs are exported first). Returns at once."""
        if self.isRunning():
            raise RuntimeError(_("A job is already running: cancel it or wait for it to finish."))
        # The engine runs in the engine's folder: relative paths would point there, not where the user meant.
        request.output_folder = _absolute(request.output_folder)
        request.datasets = [_absolute(spec) for spec in request.datasets]
        request.pretrain_datasets = [_absolute(spec) for spec in request.pretrain_datasets]
        for name in ("unlabeled_data", "validation_data", "init_checkpoint"):
            if getattr(request, name):
                setattr(request, name, _absolute(getattr(request, name)))
        if scenePairs:
            sceneData = os.path.join(str(request.output_folder), SCENE_DATA_FOLDER)
            datasetJson = export_scene_pairs_to_dataset(slicer.mrmlScene, list(scenePairs), sceneData,
                                                        request.organ_names())
            request.datasets = list(request.datasets) + [str(datasetJson.parent)]
        runs = plan_training(request, python_slicer_executable())
        os.makedirs(str(request.output_folder), exist_ok=True)
        self._afterJob = None
        self._startRuns(runs)

    def _startRuns(self, runs) -> None:
        engineParent = self.engineParentFolder()
        startupPythonPath = slicer.util.startupEnvironment().get("PYTHONPATH")
        self.controller.start(runs, cwd=engineParent, env=engine_environment(engineParent, startupPythonPath))

    def cancel(self) -> None:
        """Ask the running job to stop (checkpoint first); a second call ends it at once."""
        self.controller.cancel()

    def stopAndWait(self, timeoutSec: float = 30.0) -> Optional[JobResult]:
        """Stop the running job and wait until it has ended (used when the scene or module closes)."""
        return self.controller.stop_and_wait(timeoutSec, pump=slicer.app.processEvents)

    def wait(self, timeoutSec: Optional[float] = None) -> Optional[JobResult]:
        """Block until the running job ends, keeping the application responsive."""
        return self.controller.wait(timeoutSec, pump=slicer.app.processEvents)

    # -- applying ----------------------------------------------------------------------------
    def predict(self, volumeNode, modelFolder: str, outputSegmentation=None, device: str = "auto",
                wait: bool = True, callback=None, bodyMask: bool = True):
        """Segment ``volumeNode`` with the model in ``modelFolder`` and load the result.

        The volume is written to ``<modelFolder>/predictions/``, the engine's
        ``predict`` runs in a separate process, and its labelmap is loaded as a
        segmentation with one named, coloured segment per organ found.
        ``bodyMask=False`` keeps organs predicted outside the patient's trunk
        (air, table, separate limbs), which are background by default.

        Returns:
            With ``wait``: the segmentation node (None if prediction failed or was
            cancelled). Without: None; ``callback(segmentationNode)`` is called later.
        """
        if self.isRunning():
            raise RuntimeError(_("A job is already running: cancel it or wait for it to finish."))
        if volumeNode is None:
            raise ValueError(_("Choose a volume to segment."))
        modelFolder = _absolute(modelFolder)
        if not is_model_folder(modelFolder):
            raise ValueError(_("{folder} holds no trained model (labels.json and checkpoints/). Choose the "
                               "finetune or selftrain folder of a training output.").format(folder=modelFolder))
        labels = read_labels(modelFolder)
        colors = read_colors(modelFolder)
        predictionsFolder = os.path.join(modelFolder, "predictions")
        safeName = "".join(c if c.isalnum() or c in "-_" else "_" for c in volumeNode.GetName()) or "volume"
        imagePath = os.path.join(predictionsFolder, f"{safeName}_input.nrrd")
        outputPath = os.path.join(predictionsFolder, f"{safeName}_segmentation.nrrd")
        write_volume(volumeNode, imagePath)
        if os.path.exists(outputPath):
            os.remove(outputPath)
        run = predict_run(python_slicer_executable(), modelFolder, imagePath, outputPath, device, bodyMask)
        loaded = {}

        def load(result: JobResult) -> None:
            segmentation = None
            try:
                if result.status == JobStatus.SUCCEEDED:
                    segmentation = import_labelmap_as_segmentation(
                        slicer.mrmlScene, outputPath, labels, reference_volume=volumeNode, colors=colors,
                        segmentation_node=outputSegmentation,
                        name=slicer.mrmlScene.GenerateUniqueName(f"{volumeNode.GetName()} ContrastiveSeg"))
                loaded["node"] = segmentation
            finally:
                if os.path.exists(imagePath):
                    os.remove(imagePath)  # the scan is in the scene already: do not keep a copy
            if callback is not None:
                callback(segmentation)

        self._afterJob = load
        self._startRuns([run])
        if wait:
            self.wait()
            return loaded.get("node")
        return None

    def computeDice(self, segmentationNode, referenceSegmentationNode, tableNode=None, referenceVolume=None):
        """Per-organ Dice (segments matched by name) as a table node; see ``ContrastiveSegMRML.dice_table``."""
        if segmentationNode is None or referenceSegmentationNode is None:
            raise ValueError(_("Choose the segmentation to score and the reference segmentation."))
        return dice_table(slicer.mrmlScene, segmentationNode, referenceSegmentationNode, table_node=tableNode,
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

    def _onFinished(self, result: JobResult) -> None:
        afterJob, self._afterJob = self._afterJob, None
        if result.status == JobStatus.FAILED:
            logging.error("ContrastiveSeg job failed: %s", result.message)
        if afterJob is not None:
            try:
                afterJob(result)
            except Exception as error:
                logging.error("ContrastiveSeg: could not load the result: %s", error)
                result = JobResult(JobStatus.FAILED, result.exit_code, str(error), run_dir=result.run_dir)
        if self.finishedCallback:
            self.finishedCallback(result)


#
# ContrastiveSegTest
#


class ContrastiveSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest): MRML import + Dice on the sample data, then a
    quick CPU fine-tune of a few steps, prediction, Dice, and a cancel with a check that no engine
    process is left. The training part needs torch and MONAI; without them it says so and stops."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SampleDataImportAndDice()
        self.setUp()
        self.test_TrainPredictCancel()

    def test_SampleDataImportAndDice(self) -> None:
        self.delayDisplay("Loading the sample CT and its organ segmentation")
        logic = ContrastiveSegLogic()
        volume, segmentation = logic.loadSampleData()
        names = list(segment_names(segmentation).values())
        self.assertIn("liver", names)
        self.assertIn("spleen", names)
        table = logic.computeDice(segmentation, segmentation, referenceVolume=volume)
        self.assertEqual(table.GetNumberOfRows(), len(names))
        dice = table.GetTable().GetColumnByName("Dice")
        for row in range(table.GetNumberOfRows()):
            self.assertAlmostEqual(dice.GetValue(row), 1.0, places=6)
        self.delayDisplay("Sample data import and Dice passed")

    def test_TrainPredictCancel(self) -> None:
        from ContrastiveSegJob.requirements import missing_requirements, read_requirements
        from ContrastiveSegJob.treekill import pid_alive
        from ContrastiveSegSlicer.dependencies import torch_available

        logic = ContrastiveSegLogic()
        if not torch_available() or missing_requirements(read_requirements(logic.resourcePath("requirements.txt"))):
            self.delayDisplay("torch / MONAI are not installed: training test not run. Install them with the "
                              "module's Start button (it asks first) and run the test again.")
            return
        volume, segmentation = logic.loadSampleData()
        output = os.path.join(slicer.app.temporaryPath, "ContrastiveSegSelfTest")
        for folder in (output, output + "_cancel"):
            if os.path.isdir(folder):
                delete_output_folder(folder)

        self.delayDisplay("Quick CPU fine-tuning (a few steps)")
        result = logic.train(scenePairs=[(volume, segmentation)], organs="liver, spleen", outputFolder=output,
                             model="unet", modelSize="tiny", patchSize=32, maxSteps=4, device="cpu", seed=1, wait=True,
                             checkDependencies=False)
        self.assertIsNotNone(result)
        self.assertEqual(result.status, JobStatus.SUCCEEDED, result.message)
        self.assertTrue(is_model_folder(result.run_dir))
        self.assertEqual(sorted(read_labels(result.run_dir).values()), ["liver", "spleen"])
        self.assertGreaterEqual(logic.controller.state.phase.step, 1)

        self.delayDisplay("Predicting and loading the result as a segmentation")
        prediction = logic.predict(volume, result.run_dir, device="cpu", wait=True)
        self.assertIsNotNone(prediction)
        self.assertTrue(set(segment_names(prediction).values()) <= {"liver", "spleen"})
        table = logic.computeDice(prediction, segmentation, referenceVolume=volume)
        self.assertLessEqual(table.GetNumberOfRows(), 2)

        self.delayDisplay("Cancelling a long run")
        logic.train(scenePairs=[(volume, segmentation)], organs="liver", outputFolder=output + "_cancel",
                    model="unet", modelSize="tiny", patchSize=32, maxSteps=100000, device="cpu",
                    checkDependencies=False)
        pid = logic.controller.pid()
        deadline = 300.0
        waited = 0.0
        while logic.isRunning() and (logic.controller.state.phase is None or logic.controller.state.phase.step < 1):
            slicer.app.processEvents()
            qt.QThread.msleep(50)
            waited += 0.05
            self.assertLess(waited, deadline, "no training step within 5 minutes")
        logic.cancel()
        cancelled = logic.wait(120.0)
        self.assertIsNotNone(cancelled)
        self.assertIn(cancelled.status, (JobStatus.STOPPED, JobStatus.KILLED))
        self.assertFalse(pid_alive(pid), "the engine process is still running after cancel")
        self.assertFalse(os.path.exists(os.path.join(output + "_cancel", "finetune", "STOP")))
        self.delayDisplay(f"Train / predict / cancel passed ({format_duration(waited)} to the first step)")
