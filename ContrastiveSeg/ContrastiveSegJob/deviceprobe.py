"""Run as its own process by the module (never imported into Slicer): is there a GPU, and how long
does one training step take here?  Prints one JSON line; see ``devices.py`` for its use.

``python deviceprobe.py [--benchmark ARCHITECTURE SIZE PATCH]``: with ``--benchmark`` (e.g.
``unet small 64,64,32``) and the engine importable, ``seconds_per_step`` is the mean of two
optimisation steps on random patches (batch 2, 3 classes) after one warm-up step.
"""

import json
import sys
import time
from typing import Dict, List, Optional


def _probe(benchmark: Optional[List[str]]) -> Dict[str, object]:
    import importlib.util

    result: Dict[str, object] = {"torch": None, "cuda": False, "gpu": None, "seconds_per_step": None}
    if importlib.util.find_spec("torch") is None:
        return result
    import torch

    result["torch"] = str(torch.__version__)
    result["cuda"] = bool(torch.cuda.is_available())
    if result["cuda"]:
        result["gpu"] = torch.cuda.get_device_name(0)
    if benchmark:
        try:
            result["seconds_per_step"] = _seconds_per_step(torch, *benchmark)
        except Exception as error:  # no engine, no MONAI yet: the device is still known
            result["error_benchmark"] = str(error)
    return result


def _seconds_per_step(torch, architecture: str, size: str, patch: str) -> float:
    from ContrastiveSegLib.config import ModelConfig
    from ContrastiveSegLib.models.factory import build_backbone

    edges = tuple(int(v) for v in patch.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    network = build_backbone(ModelConfig(architecture=architecture, size=size, out_channels=3,
                                         patch_size=edges)).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((2, 1) + edges, generator=generator).to(device)
    targets = torch.randint(0, 3, (2,) + edges, generator=generator).to(device)
    timings = []
    for _ in range(3):  # the first step pays for allocations: not counted
        started = time.perf_counter()
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(network(images), targets)
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    return sum(timings[1:]) / len(timings[1:])


if __name__ == "__main__":
    arguments = sys.argv[1:]
    try:
        report = _probe(arguments[1:4] if arguments[:1] == ["--benchmark"] else None)
    except Exception as error:  # reported, never raised: the GUI falls back to CPU settings
        report = {"error": str(error)}
    print(json.dumps(report), flush=True)
