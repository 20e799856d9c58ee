"""User-facing errors.

Every problem a user can fix (a missing file, two grids that disagree, an
unknown label name) is raised as :class:`InputError`.  Its message always says
which file or option is at fault, what is wrong with it, and what to do; the
command line prints it without a traceback and exits with status 2.
"""

from __future__ import annotations

from typing import Optional


class ContrastiveSegError(Exception):
    """Base class of the errors the engine raises on purpose."""


class InputError(ContrastiveSegError):
    """Bad input that the user can correct.

    Args:
        problem: what is wrong, in one sentence.
        path: the file, folder or option at fault (optional).
        fix: what the user should do about it (optional).
        details: extra lines shown below, e.g. two geometries side by side.
    """

    def __init__(self, problem: str, path: Optional[str] = None, fix: Optional[str] = None,
                 details: Optional[str] = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.fix = fix
        self.details = details
        super().__init__(self.format())

    def format(self) -> str:
        lines = [f"{self.path}: {self.problem}" if self.path else self.problem]
        if self.details:
            lines.extend("  " + line for line in self.details.rstrip().splitlines())
        if self.fix:
            lines.append(f"What to do: {self.fix}")
        return "\n".join(lines)
