"""Which computer the module runs on (GPU or not), first-run settings that fit it, and a time estimate.

Slicer's own process never imports torch: the module runs ``deviceprobe.py``
(next to this file) as a separate process when it opens
(``PythonSlicer deviceprobe.py [--benchmark ...]``).  It prints one JSON line: torch's version (None when PyTorch is not
installed yet), whether CUDA works, the GPU's name, and, when asked and the
engine can be imported, the seconds one training step of the chosen network
takes here (two optimisation steps on random patches after a warm-up one).

:func:`recommended_settings` turns that into defaults: on a GPU the network the
pre-training methods were designed for (UNETR base, 96^3 patches); without one
the demo's network and recipe (U-Net small, 64x64x32 patches at 3 mm, the
engine's ``--recipe few-label``, 800 steps), which trains on a laptop CPU in
minutes rather than hours.  The recipe was measured on that network only, so the
GPU settings leave it out (``recipe`` "none").
"""

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

PROBE_SCRIPT = "deviceprobe.py"
GPU_SETTINGS = {"model": "unetr", "modelSize": "base", "patchSize": 96, "patchDepth": 0, "spacing": 0.0,
                "maxSteps": 2000, "recipe": "none"}
CPU_SETTINGS = {"model": "unet", "modelSize": "small", "patchSize": 64, "patchDepth": 32, "spacing": 3.0,
                "maxSteps": 800, "recipe": "few-label"}


@dataclass
class DeviceInfo:
    """What the probe found. ``seconds_per_step`` is None when it was not measured."""

    torch_version: Optional[str] = None
    cuda: bool = False
    gpu_name: Optional[str] = None
    seconds_per_step: Optional[float] = None
    error: Optional[str] = None

    def describe(self) -> str:
        """One line for the GUI."""
        if self.error:
            return f"device not detected ({self.error}); CPU settings chosen"
        if self.torch_version is None:
            return "PyTorch is not installed yet: CPU settings chosen (they change once a GPU is found)"
        if self.cuda:
            return f"GPU: {self.gpu_name or 'CUDA device'} (PyTorch {self.torch_version})"
        return f"no GPU found: CPU (PyTorch {self.torch_version}); CPU-sized settings chosen"


def probe_argv(python_executable: str, benchmark: Optional[Dict[str, object]] = None) -> List[str]:
    """The probe's command line; ``benchmark``: ``{"model", "modelSize", "patch": "64,64,32"}`` to time a step."""
    argv = [str(python_executable), os.path.join(os.path.dirname(os.path.abspath(__file__)), PROBE_SCRIPT)]
    if benchmark:
        argv += ["--benchmark", str(benchmark["model"]), str(benchmark["modelSize"]), str(benchmark["patch"])]
    return argv


def parse_probe_output(lines: Iterable[str]) -> DeviceInfo:
    """The DeviceInfo of the probe's last JSON line (an error DeviceInfo when there is none)."""
    for line in reversed(list(lines)):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                values = json.loads(line)
            except ValueError:
                continue
            return DeviceInfo(values.get("torch"), bool(values.get("cuda")), values.get("gpu"),
                              values.get("seconds_per_step"), values.get("error"))
    return DeviceInfo(error="the probe printed no result")


def recommended_settings(info: DeviceInfo) -> Dict[str, object]:
    """First-run settings for the parameter node: GPU-sized with CUDA, the demo's CPU settings otherwise."""
    return dict(GPU_SETTINGS if info.cuda else CPU_SETTINGS)


def estimate_seconds(info: DeviceInfo, steps: int) -> Optional[float]:
    """Training time for ``steps`` steps from the measured seconds per step (None when not measured)."""
    if info.seconds_per_step is None or steps <= 0:
        return None
    return float(info.seconds_per_step) * steps
