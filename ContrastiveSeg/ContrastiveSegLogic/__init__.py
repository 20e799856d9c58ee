"""The module's logic: training, resuming, segmenting and scoring, usable headless and from the Python console.

It needs MRML (``slicer`` node classes) but no Qt and no Slicer application:
everything that does (process runners, timers, settings, the install dialog)
is handed in as :class:`.services.LogicServices`, so CI runs the logic for real
on slicer-core with a fake process runner and timer.

* :mod:`.services`: the collaborators the logic is given;
* :mod:`.logic`: :class:`.logic.JobLogic`, the logic itself.
"""
