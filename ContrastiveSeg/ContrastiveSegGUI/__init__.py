"""The module's GUI side, which needs the Slicer application (Qt, ``ScriptedLoadableModule``):

* :mod:`.parameters`: the parameter node (``@parameterNodeWrapper``) the widgets are bound to;
* :mod:`.modulelogic`: ``ContrastiveSegLogic``, the logic wired to the running Slicer;
* :mod:`.widget`: ``ContrastiveSegWidget``, GUI wiring only: every action calls the logic;
* :mod:`.selftest`: ``ContrastiveSegTest``, the self-test run by Reload and Test or ctest.

Checked statically in CI (ruff, the .ui widget names, parameter fields, the Slicer API table);
run for real by the self-test inside Slicer.
"""
