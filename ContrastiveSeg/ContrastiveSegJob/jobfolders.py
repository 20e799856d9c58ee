"""Where training jobs go: a persistent output root, one new folder per training request, explicit resume.

Every training request gets its own job folder inside the output root, named by
date, time and organs (``20260130-141502_liver-spleen``), so a second training
can never find, skip or continue the first one by accident.  Continuing is an
explicit action on one chosen earlier job, allowed only when what that job
trained (its engine ``config.json``: organs, data, network, patch, spacing) is
what the new request asks for (:func:`resume_mismatches`).

The output root defaults to a ``ContrastiveSeg`` folder in the user's documents
(never Slicer's temporary folder, which is wiped on reboot or by Windows Storage
Sense); the module remembers the user's choice in its settings.

No Qt and no Slicer here.
"""

import datetime
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .commands import FINETUNE_FOLDER, PRETRAINING_METHODS, SELFTRAIN_FOLDER, TrainingRequest, final_run_dir
from .runfolder import CONFIG_FILE, RunStatus, run_status

OUTPUT_ROOT_NAME = "ContrastiveSeg"
_MODEL_FOLDERS = (FINETUNE_FOLDER, SELFTRAIN_FOLDER)


def default_output_root(documents_folder: Optional[str], home_folder: Optional[str] = None) -> str:
    """``<documents>/ContrastiveSeg`` (``<home>/ContrastiveSeg`` when there is no documents folder)."""
    base = documents_folder or home_folder or os.path.expanduser("~")
    return os.path.join(os.path.abspath(base), OUTPUT_ROOT_NAME)


def is_inside(path: str, folders: Sequence[Optional[str]]) -> bool:
    """Whether ``path`` is one of ``folders`` or inside one (e.g. a temporary folder)."""
    target = os.path.normcase(os.path.abspath(path))
    for folder in folders:
        if not folder:
            continue
        base = os.path.normcase(os.path.abspath(folder))
        if target == base or target.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


def job_folder_name(organs: Sequence[str], now: datetime.datetime) -> str:
    """``"20260130-141502_liver-spleen"``: date, time and organs (shortened to fit any file system)."""
    organ_part = re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(organs)).strip("_-")[:60] or "organs"
    return f"{now:%Y%m%d-%H%M%S}_{organ_part}"


def new_job_folder(output_root: str, organs: Sequence[str], now: Optional[datetime.datetime] = None) -> str:
    """Create and return a new, empty job folder in ``output_root`` (``_2``, ``_3``, ... if the name is taken)."""
    now = now or datetime.datetime.now()
    base = os.path.join(os.path.abspath(output_root), job_folder_name(organs, now))
    candidate, number = base, 1
    while True:
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            number += 1
            candidate = f"{base}_{number}"


def saved_config(job_folder: str) -> Optional[Dict[str, Any]]:
    """The engine's ``config.json`` of the job's model run (finetune/ or selftrain/), or None."""
    for name in _MODEL_FOLDERS:
        path = Path(job_folder) / name / CONFIG_FILE
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                return None
    return None


def requested_config(request: TrainingRequest) -> Dict[str, Any]:
    """What a request fixes, in the terms of the engine's config.json (None: left to the engine)."""
    return {
        "method": request.method,
        "organs": request.organ_names(),
        "datasets": sorted(os.path.abspath(str(spec)) for spec in request.datasets),
        "network": request.model,
        "network_size": request.model_size,
        "patch": _patch_tuple(request.patch_size),
        "spacing": _spacing_tuple(request.spacing),
    }


def resume_mismatches(job_folder: str, request: TrainingRequest) -> List[str]:
    """Why ``request`` cannot continue the job in ``job_folder`` (empty: it can).

    ``request.datasets`` must already hold the job's exported scene data, as a
    resumed job trains on what it exported at its start.
    """
    config = saved_config(job_folder)
    if config is None:
        return [f"{job_folder} holds no training run with saved settings (no finetune/ or selftrain/ config.json); "
                "start a new training instead"]
    wanted = requested_config(request)
    model = config.get("model", {}) or {}
    data = config.get("data", {}) or {}
    preprocess = config.get("preprocess", {}) or {}
    saved_method_folder = SELFTRAIN_FOLDER if (Path(job_folder) / SELFTRAIN_FOLDER / CONFIG_FILE).is_file() \
        else FINETUNE_FOLDER
    problems = []
    if os.path.basename(final_run_dir(request)) != saved_method_folder:
        problems.append(f"method: the job is a {saved_method_folder} run, the request asks for {request.method}")
    if request.method in PRETRAINING_METHODS and not (Path(job_folder) / f"pretrain_{request.method}").is_dir():
        problems.append(f"method: the job has no {request.method} pre-training")
    saved_organs = [str(name) for name in data.get("labels", [])]
    if saved_organs != wanted["organs"]:
        problems.append(f"organs: the job trained {', '.join(saved_organs) or 'none'}, the request asks for "
                        f"{', '.join(wanted['organs'])}")
    saved_data = sorted(os.path.abspath(str(spec)) for spec in data.get("datasets", []))
    if request.method != "selftrain" and saved_data != wanted["datasets"]:
        problems.append(f"data: the job trained on {', '.join(saved_data) or 'nothing'}, the request on "
                        f"{', '.join(wanted['datasets'])}")
    checks = (("network", wanted["network"], model.get("architecture")),
              ("network size", wanted["network_size"], model.get("size")),
              ("patch", wanted["patch"], _patch_tuple(model.get("patch_size"))),
              ("spacing", wanted["spacing"], _spacing_tuple(preprocess.get("spacing"))))
    for label, asked, saved in checks:
        if asked is not None and asked != saved:
            problems.append(f"{label}: the job used {saved}, the request asks for {asked}")
    return problems


def job_status(job_folder: str, method: str = "none") -> RunStatus:
    """The status of the job's model run (finetune/ or selftrain/)."""
    folder = SELFTRAIN_FOLDER if method == "selftrain" else FINETUNE_FOLDER
    return run_status(os.path.join(job_folder, folder))


def _patch_tuple(value) -> Optional[tuple]:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        parts = [int(v) for v in value]
    else:
        parts = [int(v) for v in str(value).replace("x", ",").split(",") if v.strip()]
    return tuple(parts * 3) if len(parts) == 1 else tuple(parts)


def _spacing_tuple(value) -> Optional[tuple]:
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, (list, tuple)):
        parts = [float(v) for v in value]
    else:
        parts = [float(v) for v in str(value).split(",") if v.strip()]
    return tuple(parts * 3) if len(parts) == 1 else tuple(parts)
