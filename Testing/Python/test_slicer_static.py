"""Static guards for the Slicer GUI code, which cannot run without a Slicer application.

* ruff finds no undefined names, unused imports or syntax Slicer 5.8 (Python 3.9) lacks;
* annotations evaluated at run time use no ``X | Y`` (Python 3.10+);
* every ``self.ui.<name>`` used by the module is a widget of ``Resources/UI/ContrastiveSeg.ui``;
* every ``SlicerParameterName`` in the .ui is a field of the ``@parameterNodeWrapper`` class,
  of a type the widget can hold;
* every Slicer API the module uses is one checked by hand in Slicer's source (table below);
* the Qt-free packages stay Qt-free.
"""

import ast
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Set

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "ContrastiveSeg"
MODULE_FILE = MODULE_DIR / "ContrastiveSeg.py"
PARAMETER_FILE = MODULE_DIR / "ContrastiveSegGUI" / "parameters.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ContrastiveSeg.ui"
SHIPPED_PACKAGES = ("ContrastiveSegJob", "ContrastiveSegMRML", "ContrastiveSegSlicer", "ContrastiveSegLogic",
                    "ContrastiveSegGUI")

# Every Slicer API (and API of another Slicer module or extension) the module code uses, with the file of
# Slicer's source (Slicer/Slicer unless another repository is named) where it was read. Signatures and
# behaviour were checked there; the slicer-core 5.13 copy of Base/Python/slicer/util.py was read too.
CHECKED_SLICER_API = {
    "slicer.ScriptedLoadableModule.ScriptedLoadableModule": "Base/Python/slicer/ScriptedLoadableModule.py",
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic": "Base/Python/slicer/ScriptedLoadableModule.py (getParameterNode)",
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleTest": "Base/Python/slicer/ScriptedLoadableModule.py (delayDisplay, runTest)",
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget": "Base/Python/slicer/ScriptedLoadableModule.py (resourcePath, onReload)",
    "slicer.parameterNodeWrapper.parameterNodeWrapper": "Base/Python/slicer/parameterNodeWrapper/wrapper.py (connectGui, disconnectGui)",
    "slicer.parameterNodeWrapper.Choice": "Base/Python/slicer/parameterNodeWrapper/validators.py; QComboBox needs it (guiConnectors.py)",
    "slicer.parameterNodeWrapper.WithinRange": "Base/Python/slicer/parameterNodeWrapper/validators.py; sets QSpinBox ranges (guiConnectors.py)",
    "slicer.i18n.tr": "Base/Python/slicer/i18n.py",
    "slicer.i18n.translate": "Base/Python/slicer/i18n.py",
    "slicer.util.VTKObservationMixin": "Base/Python/slicer/util.py (addObserver, removeObserver, removeObservers)",
    "slicer.util.loadUI": "Base/Python/slicer/util.py",
    "slicer.util.childWidgetVariables": "Base/Python/slicer/util.py",
    "slicer.util.tryWithErrorDisplay": "Base/Python/slicer/util.py (message, show, waitCursor)",
    "slicer.util.errorDisplay": "Base/Python/slicer/util.py (text, windowTitle)",
    "slicer.util.confirmOkCancelDisplay": "Base/Python/slicer/util.py (text, windowTitle)",
    "slicer.util.confirmYesNoDisplay": "Base/Python/slicer/util.py",
    "slicer.util.launchConsoleProcess": "Base/Python/slicer/util.py: blocking=False, logCallback, completedCallback "
                                        "from 5.12 (checked at run time with inspect.signature; QProcess before)",
    "slicer.util.startupEnvironment": "Base/Python/slicer/util.py (environment without launcher values)",
    "slicer.app.connect": "Utilities/Templates/Modules/Scripted/TemplateKey.py (startupCompleted() for sample data); "
                          "Base/QTGUI/qSlicerApplication aboutToQuit()",
    "slicer.app.disconnect": "PythonQt QObject.disconnect(signal, callable), the counterpart of connect; "
                             "slicer.app.disconnect(\"aboutToQuit()\", callable) is used so by other scripted "
                             "extensions' cleanup()",
    "slicer.app.processEvents": "Base/Python/slicer/util.py (logProcessOutput pumps events the same way)",
    "slicer.app.temporaryPath": "Base/QTCore/qSlicerCoreApplication.h (Q_PROPERTY temporaryPath)",
    "slicer.mrmlScene": "Base/Python/slicer/__init__.py docs (slicer.mrmlScene in the GUI application)",
    "slicer.mrmlScene.Clear": "Libs/MRML/Core/vtkMRMLScene.h",
    "slicer.mrmlScene.StartCloseEvent": "Libs/MRML/Core/vtkMRMLScene.h (used by the scripted module template)",
    "slicer.mrmlScene.EndCloseEvent": "Libs/MRML/Core/vtkMRMLScene.h (used by the scripted module template)",
    "slicer.mrmlScene.GetFirstNodeByClass": "Libs/MRML/Core/vtkMRMLScene.h",
    "slicer.vtkMRMLScalarVolumeNode": "Libs/MRML/Core/vtkMRMLScalarVolumeNode.h (also run in CI via slicer-core)",
    "slicer.vtkMRMLSegmentationNode": "Libs/MRML/Core/vtkMRMLSegmentationNode.h (also run in CI via slicer-core)",
    "slicer.vtkMRMLVolumeArchetypeStorageNode": "Libs/MRML/Core/vtkMRMLVolumeArchetypeStorageNode.h (run in CI)",
    "slicer.vtkMRMLSegmentationStorageNode": "Libs/MRML/Core/vtkMRMLSegmentationStorageNode.cxx (Segment<N>_Name, "
                                            "_LabelValue, _Layer header fields; run in CI)",
    "slicer.vtkOrientedImageData": "Libs/vtkSegmentationCore/vtkOrientedImageData.h (run in CI)",
    "slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName":
        "Libs/vtkSegmentationCore/vtkSegmentationConverter.h (run in CI)",
    "slicer.vtkSegmentationConverter.DeserializeImageGeometry":
        "Libs/vtkSegmentationCore/vtkSegmentationConverter.h (geometry, image, allocateScalars, scalarType, "
        "components; run in CI)",
    "slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode":
        "Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.h (run in CI)",
    "slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode":
        "Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.h (segmentIDs numbered 1..n in the "
        "order given; run in CI)",
    "slicer.vtkSlicerSegmentationsModuleLogic.CreateLabelmapVolumeFromOrientedImageData":
        "Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.cxx (run in CI)",
    "SampleData.SampleDataLogic.registerCustomSampleDataSource":
        "Modules/Scripted/SampleData/SampleData.py (category, sampleName, uris, fileNames, nodeNames, "
        "thumbnailFileName, loadFileType (kept for 5.8), checksums 'SHA256:<digest>')",
    "PyTorchUtils.PyTorchUtilsLogic": "fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py "
                                      "(installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement))",
}
API_ROOTS = {"slicer", "SampleData", "PyTorchUtils"}


def gui_side_files():
    files = [MODULE_FILE]
    for package in SHIPPED_PACKAGES:
        files += sorted((MODULE_DIR / package).glob("*.py"))
    return files


def test_ruff_finds_no_undefined_names_unused_imports_or_new_syntax():
    completed = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--target-version", "py39",
         "--select", "F,E9", "--output-format", "concise", str(MODULE_DIR)],
        capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_undefined_names_are_caught_by_the_linter(tmp_path):
    """The guard above works: ruff reports a misspelt name (F821)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import slicer\n\n\ndef f():\n    return slicer.util.loadUI(resourcePathh('x'))\n")
    completed = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--select", "F821",
                                str(bad)], capture_output=True, text=True)
    assert completed.returncode == 1 and "F821" in completed.stdout


@pytest.mark.parametrize("path", gui_side_files() + [MODULE_DIR / "Scripts" / "update_engine_file_list.py"],
                         ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_python_3_9_syntax_and_annotations(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, feature_version=(3, 9))
    postponed = any(isinstance(node, ast.ImportFrom) and node.module == "__future__" and
                    any(alias.name == "annotations" for alias in node.names) for node in tree.body)
    if postponed:
        return
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations += [arg.annotation for arg in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for annotation in annotations:
            if annotation is None or isinstance(annotation, ast.Constant):
                continue
            for part in ast.walk(annotation):
                assert not (isinstance(part, ast.BinOp) and isinstance(part.op, ast.BitOr)), (
                    f"{path.name}:{part.lineno}: 'X | Y' in an annotation fails on Python 3.9 (Slicer 5.8)")


def ui_widgets() -> Dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {widget.get("name"): widget for widget in root.iter("widget")}


def ui_parameter_names() -> Dict[str, str]:
    """``{SlicerParameterName: widget class}`` from the .ui file."""
    names = {}
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[prop.findtext("string")] = widget.get("class")
    return names


def self_ui_names(path: Path) -> Set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def test_every_self_ui_name_is_a_widget_of_the_ui_file():
    widgets = set(ui_widgets())
    used = set()
    for path in gui_side_files():
        used |= self_ui_names(path)
    assert len(used) > 30
    missing = sorted(used - widgets)
    assert not missing, f"self.ui.<name> used in the module but not in {UI_FILE.name}: {missing}"


def test_the_ui_file_is_well_formed_for_slicer():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "ContrastiveSeg"
    widgets = ui_widgets()
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used_classes = {w.get("class") for w in widgets.values()}
    assert {c for c in used_classes if c.startswith(("ctk", "qMRML"))} <= custom
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    needs_scene = {name for name, w in widgets.items() if w.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView")}
    assert needs_scene == connected, "every MRML widget must receive the scene"


def parameter_node_fields() -> Dict[str, str]:
    """``{field: annotation source}`` of the @parameterNodeWrapper class (ContrastiveSegGUI/parameters.py)."""
    source = PARAMETER_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and any(
        (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") or
        (isinstance(d, ast.Call) and getattr(d.func, "id", "") == "parameterNodeWrapper") for d in node.decorator_list)]
    assert len(classes) == 1, "exactly one @parameterNodeWrapper class expected"
    return {node.target.id: ast.get_source_segment(source, node.annotation)
            for node in classes[0].body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


# The GUI connectors of Slicer's parameterNodeWrapper compare exact widget classes (guiConnectors.py).
WIDGET_TYPES = {
    "QSpinBox": ("int",),
    "QDoubleSpinBox": ("float",),
    "QCheckBox": ("bool",),
    "QLineEdit": ("str",),
    "QComboBox": ("str",),
    "qMRMLNodeComboBox": ("vtkMRML",),
}


def test_every_slicer_parameter_name_is_a_parameter_node_field_of_a_fitting_type():
    fields = parameter_node_fields()
    bound = ui_parameter_names()
    assert len(bound) >= 15
    for name, widget_class in bound.items():
        assert name in fields, f"SlicerParameterName '{name}' is not a field of the parameter node"
        annotation = fields[name]
        base = annotation.split("[", 1)[1].split(",", 1)[0].strip() if annotation.startswith("Annotated[") else annotation
        assert widget_class in WIDGET_TYPES, f"{name}: no parameterNodeWrapper connector for {widget_class}"
        assert base.startswith(WIDGET_TYPES[widget_class]), f"{name}: {widget_class} cannot hold {annotation}"
        if widget_class == "QComboBox":
            assert "Choice(" in annotation, f"{name}: a QComboBox needs a Choice annotation"
        if widget_class in ("QSpinBox", "QDoubleSpinBox"):
            assert "WithinRange(" in annotation, f"{name}: without a range the connector sets +-2^31"


def api_uses(path: Path) -> Set[str]:
    """Dotted Slicer names a file uses: outermost attribute chains and ``from slicer.x import y``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    uses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(parents.get(node), ast.Attribute):
            parts, current = [], node
            while isinstance(current, ast.Attribute):
                parts.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name) and current.id in API_ROOTS:
                uses.add(".".join([current.id] + parts[::-1]))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in API_ROOTS:
            uses.update(f"{node.module}.{alias.name}" for alias in node.names)
    return uses


def test_every_slicer_api_used_was_checked_in_slicers_source():
    used = {}
    for path in gui_side_files():
        for name in api_uses(path):
            used.setdefault(name, []).append(path.relative_to(MODULE_DIR).as_posix())
    unchecked = {name: files for name, files in used.items() if name not in CHECKED_SLICER_API}
    assert not unchecked, ("Slicer APIs used but not checked against Slicer's source; read them there and add "
                           f"them to CHECKED_SLICER_API with the file: {unchecked}")
    calls_util = {n for n in used if n.startswith("slicer.util.")}
    assert "slicer.util.launchConsoleProcess" in calls_util
    # Packages are installed by a pip process with a constraints file (ContrastiveSegJob/installplan.py),
    # torch only through the PyTorch extension (issue 10, defect 1).
    assert "PyTorchUtils.PyTorchUtilsLogic" in used
    stale = sorted(set(CHECKED_SLICER_API) - set(used))
    assert not stale, f"entries of CHECKED_SLICER_API no longer used (remove them): {stale}"


def test_torch_is_never_pip_installed_directly():
    for path in gui_side_files():
        source = path.read_text(encoding="utf-8")
        assert 'pip_install("torch' not in source and "pip_install('torch" not in source, path


def imported_top_modules(path: Path) -> Set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    return modules


# Scripts the module runs as their own process (never imported into Slicer): they may import torch.
SUBPROCESS_SCRIPTS = {"deviceprobe.py"}


def test_qt_free_packages_stay_qt_free():
    for path in sorted((MODULE_DIR / "ContrastiveSegJob").glob("*.py")):
        forbidden = {"qt", "ctk", "slicer", "vtk"} | (set() if path.name in SUBPROCESS_SCRIPTS else {"torch", "monai"})
        assert not imported_top_modules(path) & forbidden, path.name
    for path in gui_side_files():
        for script in SUBPROCESS_SCRIPTS:
            assert script[:-3] not in imported_top_modules(path) and f"import {script[:-3]}" not in \
                path.read_text(encoding="utf-8"), f"{path.name} imports {script}, which must only run as a process"
    for path in sorted((MODULE_DIR / "ContrastiveSegMRML").glob("*.py")):
        assert not imported_top_modules(path) & {"qt", "ctk", "torch", "monai"}, path.name
        uses = api_uses(path)
        assert not {u for u in uses if u.startswith(("slicer.util", "slicer.app", "slicer.mrmlScene"))}, path.name


def test_windows_helper_processes_open_no_console_window():
    """taskkill, tasklist and the quit watchdog run with CREATE_NO_WINDOW (a console flashed before)."""
    tree = ast.parse((MODULE_DIR / "ContrastiveSegJob" / "treekill.py").read_text(encoding="utf-8"))
    windows_calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("run", "Popen"):
            text = ast.unparse(node)
            if "taskkill" in text or "tasklist" in text or "--after" in text or "argv" in text:
                windows_calls.append(text)
                assert "creationflags" in text or "**options" in text, text
    assert len(windows_calls) >= 3
    source = (MODULE_DIR / "ContrastiveSegJob" / "treekill.py").read_text(encoding="utf-8")
    assert "NO_WINDOW = 0x08000000" in source and "Slicer does not\nship it" in source
