"""The widget's wiring (ContrastiveSegGUI.widget) with only the Slicer GUI faked (issue 10, defects 9 and 10).

Faked: ``qt``, the application object (``slicer.app``), the widgets of the .ui,
``ScriptedLoadableModule`` and ``parameterNodeWrapper`` (not in slicer-core).
Real: slicer-core's MRML scene and ``slicer.util.tryWithErrorDisplay`` (which
shows the error and raises it again, so nested uses show two dialogs), and the
module's logic with a fake process runner.
"""

import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import slicer
import slicer.util

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ContrastiveSeg"))


class FakeApp:
    """``slicer.app``: records signal connections, never tests-enabled, no cursor."""

    temporaryPath = "/nonexistent-temporary"

    def __init__(self):
        self.connections = []

    def connect(self, signal, slot):
        self.connections.append((signal, slot))

    def disconnect(self, signal, slot):
        self.connections.remove((signal, slot))

    def testingEnabled(self):
        return False

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass

    def processEvents(self):
        pass


class FakeParameterNode(types.SimpleNamespace):
    __hash__ = object.__hash__  # observed by identity, like a node

    def __eq__(self, other):
        return self is other

    def AddObserver(self, event, callback, priority=0.0):
        return 1

    def RemoveObserver(self, tag):
        pass

    def connectGui(self, ui):
        return "tag"

    def disconnectGui(self, tag):
        pass


def _stub_module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


@pytest.fixture
def widget_module(monkeypatch, tmp_path):
    """Import ContrastiveSegGUI.widget with the GUI-only modules faked; yields (module, app, errors)."""

    class Widget:  # ScriptedLoadableModuleWidget
        def __init__(self, parent=None):
            self.parent = parent or mock.MagicMock(isEntered=False)
            self.layout = mock.MagicMock()

        def setup(self):
            pass

        def resourcePath(self, name):
            return str(REPO / "ContrastiveSeg" / "Resources" / name)

    class Logic:  # ScriptedLoadableModuleLogic
        def __init__(self, parent=None):
            pass

    app = FakeApp()
    errors = []
    qt = mock.MagicMock(name="qt")
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "slicer.i18n", _stub_module("slicer.i18n", tr=lambda text: text,
                                                                 translate=lambda context, text: text))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", _stub_module(
        "slicer.ScriptedLoadableModule", ScriptedLoadableModuleWidget=Widget, ScriptedLoadableModuleLogic=Logic,
        ScriptedLoadableModuleTest=object, ScriptedLoadableModule=object))
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", _stub_module(
        "slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls, Choice=lambda values: None,
        WithinRange=lambda low, high: None))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **options: errors.append((text, options)))
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: mock.MagicMock(name="uiWidget"))
    ui = mock.MagicMock(name="ui")
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui)
    for name in [n for n in sys.modules if n.split(".")[0] in ("ContrastiveSegGUI", "ContrastiveSegSlicer")]:
        monkeypatch.delitem(sys.modules, name)
    import ContrastiveSegGUI.widget as widget
    from ContrastiveSegJob.process import PollingScheduler, ProcessRunner
    from ContrastiveSegLogic.logic import JobLogic
    from ContrastiveSegLogic.services import LogicServices

    class IdleRunner(ProcessRunner):
        def start(self, argv, cwd, env, on_line, on_exit):
            self.running = True

        def is_running(self):
            return True

        def pid(self):
            return None

        def poll(self):
            pass

    class TestLogic(JobLogic):
        def __init__(self):
            JobLogic.__init__(self, LogicServices(
                scene=slicer.mrmlScene, runner_factory=IdleRunner, scheduler=PollingScheduler(),
                python_executable=lambda: sys.executable, engine_parent=lambda: str(tmp_path / "no engine here"),
                settings={}, documents_folder=str(tmp_path)))

        def getParameterNode(self):
            return FakeParameterNode(datasetPaths=[], pretrainDatasetPaths=[], scenePairIDs=[], trainingVolume=None,
                                     trainingSegmentation=None, organs="", method="none", modelFolder="",
                                     predictVolume=None, outputSegmentation=None, referenceSegmentation=None,
                                     defaultsChosen=False, model="unet", modelSize="small", patchSize=64,
                                     patchDepth=32, spacing=3.0, maxSteps=800, recipe="few-label")

    monkeypatch.setattr(widget, "ContrastiveSegLogic", TestLogic)
    yield widget, app, errors


@pytest.fixture
def made(widget_module):
    """A set-up widget; its scene observers are removed afterwards."""
    widget, app, errors = widget_module
    instance = widget.ContrastiveSegWidget()
    instance.setup()
    yield instance, app, errors
    instance.removeObservers()


def test_a_missing_sample_dataset_shows_one_error_dialog(made):
    instance, _, errors = made
    with pytest.raises(FileNotFoundError):
        instance.onAddSampleDataset()  # the sample is not where the test's logic looks: it fails
    assert len(errors) == 1, [text for text, _ in errors]
    assert "dataset.json" in errors[0][0]


def test_the_quit_connection_does_not_outlive_the_module(made):
    instance, app, _ = made
    assert [signal for signal, _ in app.connections].count("aboutToQuit()") == 1
    instance.cleanup()  # what Slicer calls before a reload
    assert [signal for signal, _ in app.connections].count("aboutToQuit()") == 0


def test_status_after_a_prediction_and_titles_of_failures(made):
    from ContrastiveSegJob.process import JobResult, JobStatus

    instance, _, errors = made
    instance.onJobFinished(JobResult(JobStatus.SUCCEEDED, 0, "Loaded CT ContrastiveSeg: liver, spleen",
                                     job="prediction"))
    assert instance.ui.statusLabel.text == "Loaded CT ContrastiveSeg: liver, spleen"
    instance.onJobFinished(JobResult(JobStatus.FAILED, 1, "out of memory", error_kind="internal", job="prediction"))
    assert errors[-1] == ("out of memory", {"windowTitle": "Segmentation failed"})
    instance.onJobFinished(JobResult(JobStatus.FAILED, 1, "out of memory", error_kind="internal", job="training"))
    assert errors[-1] == ("out of memory", {"windowTitle": "Training failed"})
