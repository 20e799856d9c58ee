"""Parts of the ContrastiveSeg module that need the Slicer application (Qt, PythonQt, other modules).

* :mod:`.runners`: ``launchConsoleProcess`` / ``QProcess`` runners and a ``QTimer`` scheduler;
* :mod:`.dependencies`: torch through the PyTorch extension, other packages through
  ``slicer.packaging.pip_ensure`` or ``slicer.util.pip_install``, always after asking;
* :mod:`.sampledata`: the sample CT in the Sample Data module.

Only checked statically in CI (ruff, the Slicer API table); exercised for real by
the module's self-test inside Slicer.
"""
