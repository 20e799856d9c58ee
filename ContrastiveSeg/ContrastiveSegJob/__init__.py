"""Qt-free core of the ContrastiveSeg Slicer module (no ``qt``, ``slicer``, ``vtk`` or ``torch`` imports).

* :mod:`.commands`: the engine command lines of a training request, prediction, evaluation;
* :mod:`.events`: the engine's JSON-lines events folded into a :class:`.events.ProgressState`;
* :mod:`.process`: :class:`.process.JobController` (runs engine processes in order, cancel
  sequence: STOP file, wait, kill the process tree off the GUI thread) behind an injected process runner;
* :mod:`.jobfolders`: the output root, one new folder per training, checks before resuming one;
* :mod:`.installplan`, :mod:`.requirements`: what to install without changing torch, numpy or SimpleITK;
* :mod:`.devices`: first-run settings for a GPU or a CPU and a time estimate (``deviceprobe.py``, run
  as its own process, is the only file here that imports torch);
* :mod:`.runfolder`: reading, stopping and deleting run folders;
* :mod:`.treekill`: ending a process and all its descendants, and the watchdog left when Slicer quits;
* :mod:`.datasets`, :mod:`.labels`, :mod:`.terminology`: dataset.json files, organ names (the engine's
  canonical names and synonyms), colours and SNOMED CT codes.

Everything here is tested in CI without Slicer (``Testing/Python/test_slicer_*.py``).
"""
