"""The sample abdominal CT in the Sample Data module (files shipped with the extension).

``Resources/SampleData.json`` names the files and their SHA256 checksums; it is
written by ``Scripts/update_engine_file_list.py`` and checked by
``Testing/Python/test_packaging.py``.
"""

import json
import logging
import os
from pathlib import Path
from typing import Dict, List

import slicer
from ContrastiveSegJob.commands import find_engine_parent

CATEGORY = "ContrastiveSeg"


def sample_data_description(module_dir: str) -> Dict:
    """The content of ``Resources/SampleData.json``."""
    with open(os.path.join(module_dir, "Resources", "SampleData.json"), encoding="utf-8") as file:
        return json.load(file)


def sample_file_paths(module_dir: str) -> List[str]:
    """Absolute paths of the sample files, in the order of SampleData.json."""
    description = sample_data_description(module_dir)
    engine_parent = find_engine_parent([module_dir])
    paths = []
    for entry in description["files"]:
        base = module_dir if entry["location"] == "module" else engine_parent
        if base is None:
            raise FileNotFoundError("the ContrastiveSegLib engine (and its sample data) was not found next to the module")
        paths.append(os.path.join(base, *entry["path"].split("/")))
    return paths


def register_sample_data(module_dir: str) -> None:
    """Add the sample CT (volume + organ segmentation) to the Sample Data module."""
    import SampleData

    description = sample_data_description(module_dir)
    paths = sample_file_paths(module_dir)
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        logging.warning("ContrastiveSeg sample data not registered, missing: %s", ", ".join(missing))
        return
    entries = description["files"]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=CATEGORY,
        sampleName=description["sampleName"],
        uris=[Path(path).as_uri() for path in paths],
        fileNames=[entry["fileName"] for entry in entries],
        nodeNames=[entry["nodeName"] for entry in entries],
        thumbnailFileName=os.path.join(module_dir, "Resources", "Icons", "ContrastiveSeg.png"),
        loadFileType=[entry["loadFileType"] for entry in entries],
        checksums=[f"SHA256:{entry['sha256']}" for entry in entries],
    )


def load_sample_data(module_dir: str, scene=None):
    """Load the sample CT and its organ segmentation straight from the files; returns (volume, segmentation)."""
    from ContrastiveSegMRML import load_segmentation_file, read_volume

    scene = scene or slicer.mrmlScene
    description = sample_data_description(module_dir)
    paths = sample_file_paths(module_dir)
    nodes = []
    for entry, path in zip(description["files"], paths):
        if entry["loadFileType"] == "SegmentationFile":
            node = load_segmentation_file(scene, path, name=entry["nodeName"])
        else:
            node = read_volume(scene, path, name=entry["nodeName"])
        nodes.append(node)
    volume, segmentation = nodes[0], nodes[1]
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return volume, segmentation
