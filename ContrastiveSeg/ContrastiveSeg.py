"""ContrastiveSeg: train CT organ segmentation from a few labelled scans, watch it, stop it, use it.

This file only registers the module with Slicer.  The code lives in packages next to it:

* ``ContrastiveSegGUI``: the widget (GUI wiring), the parameter node, the logic wired to Slicer, the self-test;
* ``ContrastiveSegLogic``: training, resuming, segmenting and Dice, with injected collaborators (tested in CI
  on slicer-core);
* ``ContrastiveSegJob``: Qt-free: engine command lines, events, job folders, install plan, process control;
* ``ContrastiveSegMRML``: labelmap <-> segmentation, Dice tables, scene export (tested in CI on slicer-core);
* ``ContrastiveSegSlicer``: what needs the application: process runners, installs, settings, sample data.

Written for Python 3.9 (Slicer 5.8) and later.
"""

import logging
import os

import slicer
from ContrastiveSegGUI.modulelogic import ContrastiveSegLogic
from ContrastiveSegGUI.selftest import ContrastiveSegTest
from ContrastiveSegGUI.widget import ContrastiveSegWidget
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule

# Slicer looks these up by name in this file.
__all__ = ["ContrastiveSeg", "ContrastiveSegWidget", "ContrastiveSegLogic", "ContrastiveSegTest"]


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


def _registerSampleData():
    from ContrastiveSegSlicer.sampledata import register_sample_data

    try:
        register_sample_data(os.path.dirname(os.path.abspath(__file__)))
    except Exception as error:  # sample data is a convenience: never break startup for it
        logging.warning("ContrastiveSeg: could not register sample data: %s", error)
