"""Qt-free core of the ContrastiveSeg Slicer module (no ``qt``, ``slicer``, ``vtk`` or ``torch`` imports).

* :mod:`.commands`: the engine command lines of a training request, prediction, evaluation;
* :mod:`.events`: the engine's JSON-lines events folded into a :class:`.events.ProgressState`;
* :mod:`.process`: :class:`.process.JobController` (runs engine processes in order, cancel
  sequence: STOP file, wait, kill the process tree) behind an injected process runner;
* :mod:`.runfolder`: reading, stopping and deleting run folders;
* :mod:`.treekill`: ending a process and all its descendants;
* :mod:`.datasets`, :mod:`.labels`, :mod:`.requirements`: dataset.json files, organ names and
  colours, the Python packages the engine needs.

Everything here is tested in CI without Slicer (``Testing/Python/test_slicer_*.py``).
"""
