"""``ContrastiveSegWidget``: GUI wiring only; every action calls the logic.

No action here waits on a dialog under a wait cursor or blocks for long: training,
prediction and installs run as processes, scene pairs are exported step by step,
and closing the scene or quitting Slicer never waits for a training.
"""

import os
import sys
from typing import List, Optional, Sequence, Tuple

import qt
import slicer
import vtk
from ContrastiveSegJob.commands import PRETRAINING_METHODS, TrainingRequest
from ContrastiveSegJob.datasets import read_dataset_labels
from ContrastiveSegJob.devices import CPU_SETTINGS, DeviceInfo, estimate_seconds, recommended_settings
from ContrastiveSegJob.events import ProgressState, format_duration
from ContrastiveSegJob.labels import parse_organ_list
from ContrastiveSegJob.process import JobResult, JobStatus
from ContrastiveSegJob.runfolder import folder_size_bytes, format_size, is_model_folder
from ContrastiveSegLogic.logic import TRAINING, finished_message
from ContrastiveSegMRML import format_dice
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from .modulelogic import ContrastiveSegLogic
from .parameters import ContrastiveSegParameterNode

# The packages whose code a developer's "Reload" must pick up again.
MODULE_PACKAGES = ("ContrastiveSegJob", "ContrastiveSegMRML", "ContrastiveSegSlicer", "ContrastiveSegLogic",
                   "ContrastiveSegGUI")


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


def requestFromParameterNode(node, outputRoot: str) -> TrainingRequest:
    """The training request the GUI's settings describe (scene pairs are added when it starts)."""
    pretraining = node.method in PRETRAINING_METHODS
    patch = node.patchSize if not node.patchDepth else f"{node.patchSize},{node.patchSize},{node.patchDepth}"
    return TrainingRequest(
        output_folder=outputRoot,
        organs=parse_organ_list(node.organs),
        datasets=list(node.datasetPaths),
        method=node.method,
        pretrain_datasets=list(node.pretrainDatasetPaths) if pretraining else [],
        unlabeled_data=node.unlabeledPath or None,
        validation_data=node.validationPath or None,
        model=node.model,
        model_size=node.modelSize,
        patch_size=patch,
        spacing=node.spacing or None,
        max_steps=node.maxSteps,
        pretrain_steps=node.pretrainSteps if pretraining else None,
        labeled_fraction=node.labeledFraction if node.method != "selftrain" else None,
        device=node.device,
        seed=node.seed,
        recipe=node.recipe,
    )


class ContrastiveSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only: every action calls the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingOrganList = False
        self._deviceInfo: Optional[DeviceInfo] = None
        self._quitConnected = False

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
        self._quitConnected = True

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
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.openOutputFolderButton.connect("clicked(bool)", self.onOpenOutputFolder)
        self.ui.deleteOutputFolderButton.connect("clicked(bool)", self.onDeleteOutputFolder)
        self.ui.predictButton.connect("clicked(bool)", self.onPredict)
        self.ui.computeDiceButton.connect("clicked(bool)", self.onComputeDice)

        self.initializeParameterNode()
        self.updateOutputFolder()
        self.ui.deviceLabel.text = _("Detecting the device...")
        self.logic.detectDevice(self.onDeviceDetected, benchmark={
            "model": CPU_SETTINGS["model"], "modelSize": CPU_SETTINGS["modelSize"], "patch": "64,64,32"})
        self.updateRunButtons()

    def cleanup(self) -> None:
        """Module closing (application exit or reload): never waits for a training (see onApplicationQuit)."""
        self.removeObservers()
        if self._quitConnected:
            slicer.app.disconnect("aboutToQuit()", self.onApplicationQuit)  # else it outlives a reload
            self._quitConnected = False
        if self.logic is not None:
            self.logic.onApplicationQuit()
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateOutputFolder()

    def exit(self) -> None:
        # Training goes on while the user works in other modules; only the GUI binding is dropped.
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic is not None and self.logic.isRunning() and self.logic.jobKind != TRAINING:
            self.onLog(_("[ContrastiveSeg] the scene is closing: stopping the segmentation"))
        if self.logic is not None:
            self.logic.onSceneClosing()  # a training goes on: it reads only its exported files
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onApplicationQuit(self) -> None:
        if self.logic is not None:
            self.logic.onApplicationQuit()

    def onReload(self) -> None:
        """Reload the helper packages too (dropping them from ``sys.modules`` makes the reload of the
        module file import their current code)."""
        self.cleanup()
        for name in list(sys.modules):
            if name.split(".")[0] in MODULE_PACKAGES:
                del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # -- parameter node ------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if not node.trainingVolume:
            node.trainingVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not node.predictVolume:
            node.predictVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not node.modelFolder:
            node.modelFolder = self.logic.lastModelFolder()  # remembered across scenes
        if self._deviceInfo is not None:
            self._applyRecommendedSettings()

    def setParameterNode(self, inputParameterNode: Optional[ContrastiveSegParameterNode]) -> None:
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
        self.updateEstimate()
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
        self.ui.startButton.enabled = not running and hasData and hasOrgans
        self.ui.startButton.toolTip = _("Start a new training in a new folder") if self.ui.startButton.enabled else _(
            "Add training data and choose organs first")
        self.ui.resumeButton.enabled = not running and hasData and hasOrgans
        self.ui.cancelButton.enabled = running
        self.ui.cancelButton.text = _("Stop now") if running and self.logic.controller.stopping else _("Cancel")
        canPredict = node is not None and node.predictVolume is not None and bool(node.modelFolder) and \
            is_model_folder(node.modelFolder)
        self.ui.predictButton.enabled = not running and canPredict
        self.ui.computeDiceButton.enabled = node is not None and node.outputSegmentation is not None and \
            node.referenceSegmentation is not None
        outputExists = self.logic is not None and os.path.isdir(self.logic.outputRoot())
        self.ui.openOutputFolderButton.enabled = outputExists
        self.ui.deleteOutputFolderButton.enabled = outputExists and not running

    # -- device and first-run settings -----------------------------------------------------
    def onDeviceDetected(self, info: DeviceInfo) -> None:
        self._deviceInfo = info
        self.ui.deviceLabel.text = info.describe()
        if self._parameterNode is not None:
            self._applyRecommendedSettings()
        self.updateEstimate()

    def _applyRecommendedSettings(self) -> None:
        """Once per parameter node: GPU-sized settings when a GPU was found (the defaults are CPU-sized)."""
        node = self._parameterNode
        if node.defaultsChosen:
            return
        for name, value in recommended_settings(self._deviceInfo).items():
            setattr(node, name, value)
        node.defaultsChosen = True

    def updateEstimate(self) -> None:
        info, node = self._deviceInfo, self._parameterNode
        if info is None or node is None:
            return
        measured = (node.model, node.modelSize, node.patchSize, node.patchDepth) == (
            CPU_SETTINGS["model"], CPU_SETTINGS["modelSize"], CPU_SETTINGS["patchSize"], CPU_SETTINGS["patchDepth"])
        seconds = estimate_seconds(info, node.maxSteps) if measured and not info.cuda else None
        if seconds is None:
            self.ui.estimateLabel.text = _("no estimate for these settings (measured only for the CPU defaults)")
        else:
            self.ui.estimateLabel.text = _("about {time} for {steps} steps ({perStep:.2f} s per step, measured here)").format(
                time=format_duration(seconds), steps=node.maxSteps, perStep=info.seconds_per_step)

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
        # One error dialog for whatever fails (a nested tryWithErrorDisplay showed two).
        with slicer.util.tryWithErrorDisplay(_("The sample data could not be added."), waitCursor=True):
            self._addCheckedPath(self._parameterNode.datasetPaths, self.logic.sampleDatasetFolder())
            if not self._parameterNode.organs:
                self._parameterNode.organs = "liver, spleen"
            self._refreshOrgans()

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
            self._addCheckedPath(observedList, path)

    @staticmethod
    def _addCheckedPath(observedList, path: str) -> None:
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
            self._refreshOrgans()

    def _refreshOrgans(self) -> None:
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
        folder = self._chooseFolder(_("Choose the output folder (every training gets its own folder in it)"),
                                    self.logic.outputRoot())
        if folder:
            with slicer.util.tryWithErrorDisplay(_("This folder cannot hold the outputs.")):
                self.logic.setOutputRoot(folder)
            self.updateOutputFolder()

    def updateOutputFolder(self) -> None:
        """Show the output folder and how much disk it uses."""
        root = self.logic.outputRoot()
        self.ui.outputFolderLineEdit.text = root
        self.ui.outputUsageLabel.text = _("{size} used").format(size=format_size(folder_size_bytes(root))) \
            if os.path.isdir(root) else _("empty (created at the first training)")
        self.updateRunButtons()

    def onBrowseModelFolder(self) -> None:
        folder = self._chooseFolder(_("Choose a trained model folder (finetune or selftrain)"),
                                    self._parameterNode.modelFolder)
        if folder:
            self._parameterNode.modelFolder = folder

    def onOpenOutputFolder(self) -> None:
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self.logic.outputRoot()))

    def onDeleteOutputFolder(self) -> None:
        folder = self._chooseFolder(_("Choose a training folder to delete (or the output folder itself)"),
                                    self.logic.outputRoot())
        if not folder:
            return
        size = format_size(folder_size_bytes(folder))
        if not slicer.util.confirmYesNoDisplay(
                _("Delete {folder} ({size}) with every checkpoint, log, exported scan and prediction in it? "
                  "This cannot be undone.").format(folder=folder, size=size)):
            return
        with slicer.util.tryWithErrorDisplay(_("The folder was not deleted."), waitCursor=True):
            self.logic.deleteFolder(folder)
            self.onLog(_("[ContrastiveSeg] deleted {folder} ({size})").format(folder=folder, size=size))
        self.updateOutputFolder()

    # -- training ------------------------------------------------------------------------
    def _clearProgress(self, status: str) -> None:
        self.ui.logTextEdit.clear()
        self.ui.validationTableWidget.setRowCount(0)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = status

    def onStart(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Training could not start.")):
            request = requestFromParameterNode(self._parameterNode, self.logic.outputRoot())
            self._clearProgress(_("Starting..."))
            job = self.logic.trainRequest(request, scenePairs=self._trainingPairs())
            self.onLog(_("[ContrastiveSeg] new training folder: {folder}").format(folder=job))
        self.updateOutputFolder()

    def onResume(self) -> None:
        folder = self._chooseFolder(_("Choose the training folder to continue"), self.logic.outputRoot())
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("This training cannot be continued.")):
            request = requestFromParameterNode(self._parameterNode, self.logic.outputRoot())
            self._clearProgress(_("Resuming..."))
            self.logic.trainRequest(request, scenePairs=self._trainingPairs(), resumeFolder=folder)
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
        status, errorTitle = finished_message(result)
        self.ui.statusLabel.text = status
        if result.status == JobStatus.SUCCEEDED:
            self.ui.progressBar.value = 100
            if result.job == TRAINING and result.run_dir and is_model_folder(result.run_dir) and \
                    self._parameterNode is not None:
                self._parameterNode.modelFolder = result.run_dir
        elif errorTitle is not None:
            self.ui.logCollapsibleButton.collapsed = False
            slicer.util.errorDisplay(result.message, windowTitle=errorTitle)
        self.updateOutputFolder()

    # -- applying ------------------------------------------------------------------------
    def onPredict(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start.")):
            self._clearProgress(_("Segmenting {volume}...").format(volume=node.predictVolume.GetName()))
            self.logic.predict(node.predictVolume, node.modelFolder, device=node.device, wait=False,
                               callback=self.onPredictionLoaded, bodyMask=node.bodyMask)
        self.updateRunButtons()

    def onPredictionLoaded(self, segmentationNode) -> None:
        if segmentationNode is None or self._parameterNode is None:
            return
        self._parameterNode.outputSegmentation = segmentationNode
        if self._parameterNode.referenceSegmentation is not None:
            self.onComputeDice()

    def onComputeDice(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Dice could not be computed."), waitCursor=True):
            table = self.logic.computeDice(node.outputSegmentation, node.referenceSegmentation)
            self.ui.diceTableView.setMRMLTableNode(table)
