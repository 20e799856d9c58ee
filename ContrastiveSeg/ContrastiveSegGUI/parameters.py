"""The module's state saved with the scene: fields bound to widgets carry the widget's
``SlicerParameterName`` (``Resources/UI/ContrastiveSeg.ui``)."""

from typing import Annotated, List

from ContrastiveSegJob.commands import METHODS, RECIPES
from ContrastiveSegJob.devices import CPU_SETTINGS
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper


@parameterNodeWrapper
class ContrastiveSegParameterNode:
    """Defaults are CPU-sized (the demo's settings); a GPU found at start switches them to GPU-sized ones.

    The output folder is not here: it is an application setting (it must survive closing the scene),
    and so is the last trained model.  Resuming is an action, never a saved setting.
    """

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
    maxSteps: Annotated[int, WithinRange(1, 10000000)] = CPU_SETTINGS["maxSteps"]
    patchSize: Annotated[int, WithinRange(16, 512)] = CPU_SETTINGS["patchSize"]
    patchDepth: Annotated[int, WithinRange(0, 512)] = CPU_SETTINGS["patchDepth"]
    spacing: Annotated[float, WithinRange(0.0, 20.0)] = CPU_SETTINGS["spacing"]
    labeledFraction: Annotated[float, WithinRange(0.01, 1.0)] = 1.0
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    model: Annotated[str, Choice(["unetr", "unet"])] = CPU_SETTINGS["model"]
    modelSize: Annotated[str, Choice(["tiny", "small", "base"])] = CPU_SETTINGS["modelSize"]
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    # The engine's --recipe (the Recipe box); set with the device's recommended settings (devices.py).
    recipe: Annotated[str, Choice(list(RECIPES))] = CPU_SETTINGS["recipe"]
    validationPath: str = ""
    defaultsChosen: bool = False
    # applying a model
    modelFolder: str = ""
    predictVolume: vtkMRMLScalarVolumeNode
    bodyMask: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    referenceSegmentation: vtkMRMLSegmentationNode
