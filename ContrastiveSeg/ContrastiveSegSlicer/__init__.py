"""Parts of the ContrastiveSeg module that need the Slicer application (Qt, PythonQt, other modules).

* :mod:`.runners`: ``launchConsoleProcess`` / ``QProcess`` runners and a ``QTimer`` scheduler;
* :mod:`.dependencies`: the one consent dialog, torch through the PyTorch extension, the pip run
  under a constraints file;
* :mod:`.wiring`: the logic's collaborators inside Slicer (settings, folders, runners, installer);
* :mod:`.sampledata`: the sample CT in the Sample Data module.

Only checked statically in CI (ruff, the Slicer API table); exercised for real by
the module's self-test inside Slicer.
"""
