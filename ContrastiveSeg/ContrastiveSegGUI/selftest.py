"""``ContrastiveSegTest``: the module's self-test inside Slicer (Reload and Test, or ctest)."""

import os
import tempfile

import qt
import slicer
from ContrastiveSegJob.commands import TrainingRequest
from ContrastiveSegJob.events import format_duration
from ContrastiveSegJob.process import JobStatus
from ContrastiveSegJob.runfolder import delete_output_folder, is_model_folder, read_labels
from ContrastiveSegMRML import segment_names
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from .modulelogic import ContrastiveSegLogic


class ContrastiveSegTest(ScriptedLoadableModuleTest):
    """MRML import + Dice on the sample data, then a quick CPU fine-tune of a few steps, prediction, Dice,
    and a cancel with a check that no engine process is left. The training part needs torch and MONAI;
    without them it says so and stops."""

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
        from ContrastiveSegSlicer.wiring import MODULE_DIR

        logic = ContrastiveSegLogic()
        requirements = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
        if not torch_available() or missing_requirements(read_requirements(requirements)):
            self.delayDisplay("torch / MONAI are not installed: training test not run. Install them with the "
                              "module's Start button (it asks first) and run the test again.")
            return
        volume, segmentation = logic.loadSampleData()
        output = tempfile.mkdtemp(prefix="ContrastiveSegSelfTest")  # the test's own outputs: removed below

        self.delayDisplay("Quick CPU fine-tuning (a few steps)")
        result = logic.train(scenePairs=[(volume, segmentation)], organs="liver, spleen", outputFolder=output,
                             model="unet", modelSize="tiny", patchSize=32, maxSteps=4, device="cpu", seed=1,
                             wait=True, checkDependencies=False)
        self.assertIsNotNone(result)
        self.assertEqual(result.status, JobStatus.SUCCEEDED, result.message)
        self.assertTrue(is_model_folder(result.run_dir))
        self.assertEqual(sorted(read_labels(result.run_dir).values()), ["liver", "spleen"])
        self.assertGreaterEqual(logic.controller.state.phase.step, 1)

        self.delayDisplay("Predicting and loading the result as a segmentation")
        prediction = logic.predict(volume, result.run_dir, device="cpu", wait=True, checkDependencies=False)
        self.assertIsNotNone(prediction)
        self.assertTrue(set(segment_names(prediction).values()) <= {"liver", "spleen"})
        table = logic.computeDice(prediction, segmentation, referenceVolume=volume)
        self.assertEqual(table.GetNumberOfRows(), 2)  # both organs, Dice 0 for one the model missed

        self.delayDisplay("Cancelling a long run")
        long_run = TrainingRequest(output_folder=output, organs=["liver"], model="unet", model_size="tiny",
                                   patch_size=32, max_steps=100000, device="cpu")
        job = logic.trainRequest(long_run, [(volume, segmentation)], checkDependencies=False)
        waited = 0.0
        while logic.isRunning() and (logic.controller.state.phase is None or logic.controller.state.phase.step < 1):
            slicer.app.processEvents()
            qt.QThread.msleep(50)
            waited += 0.05
            self.assertLess(waited, 300.0, "no training step within 5 minutes")
        pid = logic.controller.pid()
        logic.cancel()
        cancelled = logic.wait(120.0)
        self.assertIsNotNone(cancelled)
        self.assertIn(cancelled.status, (JobStatus.STOPPED, JobStatus.KILLED))
        self.assertFalse(pid_alive(pid), "the engine process is still running after cancel")
        self.assertFalse(os.path.exists(os.path.join(job, "finetune", "STOP")))
        delete_output_folder(output)
        self.delayDisplay(f"Train / predict / cancel passed ({format_duration(waited)} to the first step)")

