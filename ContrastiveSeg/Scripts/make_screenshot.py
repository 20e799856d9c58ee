"""Draw the extension's screenshot: the module's panel beside a segmentation it loaded.

A developer tool, not shipped with the extension. No Slicer application is needed: the panel is
the module's real ``Resources/UI/ContrastiveSeg.ui`` loaded by Qt's ``QUiLoader`` without a display,
with plain Qt stand-ins for the four CTK / qMRML widget classes it uses, and filled with what the
module shows after the tutorial's run (settings, the run's own events, the Dice of the prediction).
The result beside it is drawn by the engine's ``report/overlay.py`` from the prediction of that run.

Two steps, because the panel needs PySide6 and the result needs the engine (torch, SimpleITK), and
neither belongs in the other's environment:

    # 1. with the engine's Python: the result picture and the Dice table of a finished run
    python ContrastiveSeg/Scripts/make_screenshot.py result --run RUN --prediction PRED.seg.nrrd \\
        --metrics METRICS.json --work WORK
    # 2. with a Python that has PySide6 (QT_QPA_PLATFORM=offscreen needs no display)
    QT_QPA_PLATFORM=offscreen python ContrastiveSeg/Scripts/make_screenshot.py panel --run RUN \\
        --work WORK --out docs/images/slicer-module.png

docs/extension-index.md gives the full sequence of commands that made the committed picture.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

MODULE_DIR = Path(__file__).resolve().parents[1]
REPO = MODULE_DIR.parent
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ContrastiveSeg.ui"
SAMPLE_DIR = REPO / "ContrastiveSegLib" / "sample_data"
SAMPLE_IMAGE = SAMPLE_DIR / "abdomen_ct.nii.gz"
SAMPLE_LABELS = SAMPLE_DIR / "abdomen_ct_labels.nii.gz"
# Node names the module gives the sample data and its prediction (docs/slicer.md, tutorial).
VOLUME_NODE = "ContrastiveSegAbdomenCT"
REFERENCE_NODE = "ContrastiveSegAbdomenCT organs"
RESULT_NODE = "ContrastiveSegAbdomenCT ContrastiveSeg"
PANEL_WIDTH = 560
MAX_WIDTH = 2000  # the whole picture is scaled down to this width to keep the file small


def make_result(run: Path, prediction: Path, metrics_path: Path, work: Path) -> None:
    """Write ``work/result.png`` (prediction above reference) and ``work/result.json`` (Dice rows)."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    import SimpleITK as sitk

    from ContrastiveSegLib.data.io import read_image, read_label_image, resample_label_image
    from ContrastiveSegLib.report.overlay import save_overlay_png

    names = {int(value): name for value, name in json.loads((run / "labels.json").read_text()).items()
             if int(value) != 0}
    colors = json.loads((run / "colors.json").read_text())
    image = read_image(str(SAMPLE_IMAGE))
    predicted = resample_label_image(read_label_image(str(prediction)), image).layers[0]
    reference = resample_label_image(read_label_image(str(SAMPLE_LABELS)), image).layers[0]
    sample_names = json.loads((SAMPLE_DIR / "dataset.json").read_text())["labels"]
    value_of = {name: value for value, name in names.items()}
    reference_mapped = np.zeros_like(predicted)
    for key, name in sample_names.items():
        if name in value_of:
            reference_mapped[reference == int(key)] = value_of[name]
    work.mkdir(parents=True, exist_ok=True)
    save_overlay_png(work / "result.png", sitk.GetArrayFromImage(image), predicted,
                     tuple(reversed(image.GetSpacing())), names, colors=colors,
                     title="Sample CT: the model's segmentation (top) and the reference (bottom)",
                     reference_zyx=reference_mapped, direction=image.GetDirection())

    metrics = json.loads(metrics_path.read_text())
    reference_image = read_label_image(str(SAMPLE_LABELS)).image
    millilitres_per_voxel = float(np.prod(reference_image.GetSpacing())) / 1000.0
    rows = [{"organ": organ, "dice": dice,
             "volume_ml": metrics["voxels"][organ]["prediction"] * millilitres_per_voxel,
             "reference_volume_ml": metrics["voxels"][organ]["reference"] * millilitres_per_voxel}
            for organ, dice in metrics["dice"].items()]
    (work / "result.json").write_text(json.dumps({"dice_rows": rows}, indent=2))


def load_panel(qt):
    """The module's .ui as a widget; CTK / qMRML classes replaced by plain Qt look-alikes."""
    QtCore, QtWidgets, QtUiTools = qt

    class ctkCollapsibleButton(QtWidgets.QGroupBox):  # class names as the .ui spells them
        """A titled box; ``collapsed`` hides its content as CTK's button does."""

        def _text(self):
            return self.title()

        def _set_text(self, value):
            self.setTitle(value)

        def _collapsed(self):
            return getattr(self, "_is_collapsed", False)

        def _set_collapsed(self, value):
            self._is_collapsed = bool(value)

        text = QtCore.Property(str, _text, _set_text)
        collapsed = QtCore.Property(bool, _collapsed, _set_collapsed)

    class qMRMLNodeComboBox(QtWidgets.QComboBox):
        pass

    class qMRMLTableView(QtWidgets.QTableWidget):
        pass

    class qMRMLWidget(QtWidgets.QWidget):
        pass

    loader = QtUiTools.QUiLoader()
    for stand_in in (ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLTableView, qMRMLWidget):
        loader.registerCustomWidget(stand_in)
    panel = loader.load(str(UI_FILE))
    if panel is None:
        raise SystemExit(f"{UI_FILE}: Qt could not load it ({loader.errorString()})")
    for box in panel.findChildren(ctkCollapsibleButton):
        if box.property("collapsed"):
            for child in box.findChildren(QtWidgets.QWidget):
                child.hide()
            box.setMaximumHeight(24)
    return panel


def fill_panel(panel, QtWidgets, run: Path, rows: List[Dict]) -> None:
    """Put in the tutorial's choices and what the module shows once the run and the Dice are done."""
    sys.path.insert(0, str(MODULE_DIR))
    from ContrastiveSegJob.events import ProgressState, parse_event_line

    def child(kind, name):
        widget = panel.findChild(kind, name)
        if widget is None:
            raise SystemExit(f"{UI_FILE} has no {kind.__name__} named {name!r}: update {Path(__file__).name}")
        return widget

    config = json.loads((run / "config.json").read_text())
    organs = config["data"]["labels"]
    for name, text in (("trainingVolumeSelector", VOLUME_NODE), ("trainingSegmentationSelector", REFERENCE_NODE),
                       ("predictVolumeSelector", VOLUME_NODE), ("outputSegmentationSelector", RESULT_NODE),
                       ("referenceSegmentationSelector", REFERENCE_NODE)):
        child(QtWidgets.QComboBox, name).addItem(text)
    child(QtWidgets.QListWidget, "scenePairListWidget").addItem(f"{VOLUME_NODE}  +  {REFERENCE_NODE}")
    # "Find organs in the data" lists every organ the sample names; the tutorial ticks liver and spleen.
    organ_list = child(QtWidgets.QListWidget, "organListWidget")
    sample_names = json.loads((SAMPLE_DIR / "dataset.json").read_text())["labels"]
    for organ in sorted(name for key, name in sample_names.items() if key != "0"):
        item = QtWidgets.QListWidgetItem(organ)
        item.setCheckState(_checked(organ in organs))
        organ_list.addItem(item)
        if organ == organs[0]:
            first_ticked = item
    organ_list.scrollToItem(first_ticked, QtWidgets.QAbstractItemView.ScrollHint.PositionAtTop)
    child(QtWidgets.QLineEdit, "organsLineEdit").setText(", ".join(organs))
    child(QtWidgets.QComboBox, "methodComboBox").addItem("none")
    child(QtWidgets.QSpinBox, "stepsSpinBox").setValue(config["train"]["max_steps"])
    child(QtWidgets.QSpinBox, "patchSizeSpinBox").setValue(config["model"]["patch_size"][0])
    child(QtWidgets.QComboBox, "deviceComboBox").addItem("auto")
    child(QtWidgets.QComboBox, "modelComboBox").addItem(config["model"]["architecture"])
    child(QtWidgets.QSpinBox, "seedSpinBox").setValue(config["train"]["seed"])
    child(QtWidgets.QLineEdit, "outputFolderLineEdit").setText("~/ContrastiveSeg/tutorial")
    child(QtWidgets.QLineEdit, "modelFolderLineEdit").setText("~/ContrastiveSeg/tutorial/finetune")
    child(QtWidgets.QCheckBox, "bodyMaskCheckBox").setChecked(True)

    state = ProgressState.for_phases(["finetune"], [str(run)])
    state.begin_phase(0)
    for line in (run / "events.jsonl").read_text().splitlines():
        event = parse_event_line(line)
        if event is not None:
            state.apply(event)
    child(QtWidgets.QProgressBar, "progressBar").setValue(state.percent())
    child(QtWidgets.QLabel, "statusLabel").setText(f"Loaded {RESULT_NODE}: {', '.join(organs)}")
    child(QtWidgets.QLabel, "lossLabel").setText(f"{state.loss:.4g}" if state.loss is not None else "-")
    validation = child(QtWidgets.QTableWidget, "validationTableWidget")
    dice_rows = state.dice_rows()
    validation.setColumnCount(2)
    validation.setHorizontalHeaderLabels(["Organ", "Dice"])
    validation.setRowCount(len(dice_rows) + 1)
    for index, row in enumerate(dice_rows):
        validation.setItem(index, 0, QtWidgets.QTableWidgetItem(row["organ"]))
        validation.setItem(index, 1, QtWidgets.QTableWidgetItem(f"{row['dice']:.3f}"))
    validation.setItem(len(dice_rows), 0, QtWidgets.QTableWidgetItem("mean"))
    validation.setItem(len(dice_rows), 1, QtWidgets.QTableWidgetItem(f"{state.mean_dice:.3f}"))
    validation.horizontalHeader().setStretchLastSection(True)
    validation.setFixedHeight(110)

    table = child(QtWidgets.QTableWidget, "diceTableView")
    headers = ["Organ", "Dice", "Volume (mL)", "Reference volume (mL)"]
    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.setRowCount(len(rows))
    for index, row in enumerate(rows):
        values = [row["organ"], f"{row['dice']:.3f}", f"{row['volume_ml']:.1f}", f"{row['reference_volume_ml']:.1f}"]
        for column, value in enumerate(values):
            table.setItem(index, column, QtWidgets.QTableWidgetItem(value))
    table.resizeColumnsToContents()
    table.setFixedHeight(100)
    log = child(QtWidgets.QPlainTextEdit, "logTextEdit")
    log.setPlainText("")


def _checked(flag: bool):
    from PySide6 import QtCore

    return QtCore.Qt.CheckState.Checked if flag else QtCore.Qt.CheckState.Unchecked


def make_panel(run: Path, work: Path, out: Path) -> None:
    """Render the filled panel and put it beside ``work/result.png`` in one PNG."""
    from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    panel = load_panel((QtCore, QtWidgets, QtUiTools))
    rows = json.loads((work / "result.json").read_text())["dice_rows"]
    fill_panel(panel, QtWidgets, run, rows)
    panel.setFixedWidth(PANEL_WIDTH)
    panel.adjustSize()
    app.processEvents()
    panel_pixmap = panel.grab()

    result = QtGui.QImage(str(work / "result.png"))
    if result.isNull():
        raise SystemExit(f"{work / 'result.png'} is missing: run the 'result' step first")
    # The result as tall as the panel, so that both read at the same scale side by side.
    result = result.scaledToHeight(panel_pixmap.height(), QtCore.Qt.TransformationMode.SmoothTransformation)
    margin = 12
    canvas = QtGui.QImage(panel_pixmap.width() + result.width() + 3 * margin,
                          max(panel_pixmap.height(), result.height()) + 2 * margin, QtGui.QImage.Format.Format_RGB32)
    canvas.fill(QtGui.QColor("white"))
    painter = QtGui.QPainter(canvas)
    painter.drawPixmap(margin, margin, panel_pixmap)
    painter.drawImage(panel_pixmap.width() + 2 * margin, margin, result)
    painter.end()
    if canvas.width() > MAX_WIDTH:
        canvas = canvas.scaledToWidth(MAX_WIDTH, QtCore.Qt.TransformationMode.SmoothTransformation)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not canvas.save(str(out), "PNG"):
        raise SystemExit(f"could not write {out}")
    print(f"wrote {out} ({canvas.width()} x {canvas.height()})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    result = steps.add_parser("result", help="result picture and Dice rows (the engine's Python)")
    result.add_argument("--run", type=Path, required=True, help="the finetune run folder")
    result.add_argument("--prediction", type=Path, required=True, help="its prediction of the sample CT")
    result.add_argument("--metrics", type=Path, required=True, help="contrastiveseg evaluate --out of that prediction")
    result.add_argument("--work", type=Path, required=True, help="folder for the intermediate files")
    panel = steps.add_parser("panel", help="the panel beside the result (a Python with PySide6)")
    panel.add_argument("--run", type=Path, required=True, help="the finetune run folder")
    panel.add_argument("--work", type=Path, required=True, help="the folder the 'result' step wrote")
    panel.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if args.step == "result":
        make_result(args.run, args.prediction, args.metrics, args.work)
    else:
        make_panel(args.run, args.work, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
