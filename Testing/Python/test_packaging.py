"""The extension package: every file that must ship is listed in the CMake files, and the metadata is complete.

When this fails after an engine file was added or removed, run:

    python ContrastiveSeg/Scripts/update_engine_file_list.py
"""

import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "ContrastiveSeg"
UPDATE_SCRIPT = MODULE_DIR / "Scripts" / "update_engine_file_list.py"
FIX = "run: python ContrastiveSeg/Scripts/update_engine_file_list.py"


def cmake_lists(path: Path, variables: Dict[str, str] = None) -> Dict[str, List[str]]:
    """``set(NAME item item ...)`` blocks of a CMake file, with ``${VAR}`` of ``variables`` substituted."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    variables = dict(variables or {})
    lists = {}
    for name, body in re.findall(r"\bset\(\s*([A-Za-z_][A-Za-z0-9_]*)\s+([^)]*)\)", text):
        items = [item.strip('"') for item in body.split()]
        items = [re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), item) for item in items]
        lists[name] = items
        if len(items) == 1:
            variables[name] = items[0]
    return lists


def load_update_script():
    spec = importlib.util.spec_from_file_location("update_engine_file_list", UPDATE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_file_list_matches_the_disk():
    script = load_update_script()
    python_files, other_files = script.engine_files(REPO)
    listed = cmake_lists(MODULE_DIR / "EngineFiles.cmake")
    listed_python = listed["CONTRASTIVESEG_ENGINE_PYTHON_SCRIPTS"]
    listed_other = listed["CONTRASTIVESEG_ENGINE_RESOURCES"]
    on_disk_python = sorted(str(p.relative_to(REPO).as_posix()) for p in (REPO / "ContrastiveSegLib").rglob("*.py")
                            if "__pycache__" not in p.parts)
    not_shipped = sorted(set(on_disk_python) - set(listed_python))
    assert not not_shipped, f"engine .py files not shipped by ContrastiveSeg/EngineFiles.cmake: {not_shipped}; {FIX}"
    gone = sorted(path for path in listed_python + listed_other if not (REPO / path).is_file())
    assert not gone, f"EngineFiles.cmake lists files that do not exist: {gone}; {FIX}"
    assert (listed_python, listed_other) == (python_files, other_files), f"EngineFiles.cmake is out of date; {FIX}"
    assert (MODULE_DIR / "EngineFiles.cmake").read_text(encoding="utf-8") == \
        script.render_engine_files_cmake(python_files, other_files), f"EngineFiles.cmake is out of date; {FIX}"
    for data in ("sample_data/abdomen_ct.nii.gz", "sample_data/abdomen_ct_labels.nii.gz", "sample_data/dataset.json"):
        assert f"ContrastiveSegLib/{data}" in listed_other


def test_module_cmake_ships_every_module_file():
    lists = cmake_lists(MODULE_DIR / "CMakeLists.txt")
    scripts = lists["MODULE_PYTHON_SCRIPTS"]
    resources = lists["MODULE_PYTHON_RESOURCES"]
    on_disk = sorted(p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")
                     if "__pycache__" not in p.parts and p.parts[len(MODULE_DIR.parts)] != "Scripts")
    assert sorted(scripts) == on_disk, (
        f"ContrastiveSeg/CMakeLists.txt MODULE_PYTHON_SCRIPTS differs from the .py files under ContrastiveSeg/ "
        f"(Scripts/ holds developer tools, not shipped): missing {sorted(set(on_disk) - set(scripts))}, "
        f"extra {sorted(set(scripts) - set(on_disk))}")
    resource_files = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                            if p.is_file())
    assert sorted(resources) == resource_files, "every file of ContrastiveSeg/Resources must be in MODULE_PYTHON_RESOURCES"
    # Only the module itself may sit directly in the module folder: Slicer takes every top-level .py for a module.
    assert [p.name for p in MODULE_DIR.glob("*.py")] == ["ContrastiveSeg.py"]
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "include(${CMAKE_CURRENT_SOURCE_DIR}/EngineFiles.cmake)" in text
    assert re.search(r"ctkMacroCompilePythonScript\(.*SCRIPTS \"\$\{CONTRASTIVESEG_ENGINE_PYTHON_SCRIPTS\}\""
                     r".*RESOURCES \"\$\{CONTRASTIVESEG_ENGINE_RESOURCES\}\".*SOURCE_DIR \$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\."
                     r".*DESTINATION_DIR \$\{CMAKE_BINARY_DIR\}/\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}"
                     r".*INSTALL_DIR \$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}", text, re.S)
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)


def test_extension_metadata():
    """The top-level CMakeLists.txt builds a Slicer extension; its fields are checked against the
    Extensions Index's rules in test_extension_index.py."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(ContrastiveSeg\)", text, re.M)
    lists = cmake_lists(REPO / "CMakeLists.txt")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "EXTENSION_LICENSE_FILE",
                     "EXTENSION_README_FILE"):
        assert lists.get(variable), f"{variable} is not set in the top-level CMakeLists.txt"
    assert lists["EXTENSION_LICENSE_FILE"] == ["${CMAKE_CURRENT_SOURCE_DIR}/LICENSE.txt"]
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(ContrastiveSeg)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    licence = (REPO / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0" in licence and "ContrastiveSeg contributors" in licence


def test_sample_data_checksums_are_current():
    script = load_update_script()
    description = json.loads((MODULE_DIR / "Resources" / "SampleData.json").read_text(encoding="utf-8"))
    assert description == script.sample_data_description(REPO), f"Resources/SampleData.json is out of date; {FIX}"
    for entry in description["files"]:
        base = REPO if entry["location"] == "engine" else MODULE_DIR
        digest = hashlib.sha256((base / entry["path"]).read_bytes()).hexdigest()
        assert digest == entry["sha256"]
        assert entry["loadFileType"] in ("VolumeFile", "SegmentationFile")


def test_update_script_check_mode_agrees():
    script = load_update_script()
    assert script.main(["--check"]) == 0, FIX


def test_repository_stays_small():
    shipped = [REPO / path for path in cmake_lists(MODULE_DIR / "EngineFiles.cmake")["CONTRASTIVESEG_ENGINE_RESOURCES"]]
    shipped += [p for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()]
    total = sum(path.stat().st_size for path in shipped)
    assert total < 50 * 1024 * 1024, f"shipped data is {total / 1e6:.1f} MB; the Extension Index wants < 100 MB in all"



def test_slicer_requirements_follow_the_engine_dependencies():
    """Resources/requirements.txt = the engine's dependencies minus what Slicer or the PyTorch extension provide."""
    import tomllib

    sys.path.insert(0, str(MODULE_DIR))
    from ContrastiveSegJob.requirements import NEVER_INSTALL, TORCH_REQUIREMENT, read_requirements, split_requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    engine = {}
    for requirement in project["dependencies"]:
        name, minimum = split_requirement(requirement)
        engine[name.lower()] = minimum
    slicer_side = {name.lower(): minimum for name, minimum in map(
        split_requirement, read_requirements(MODULE_DIR / "Resources" / "requirements.txt"))}
    expected = {name: minimum for name, minimum in engine.items() if name not in NEVER_INSTALL}
    assert slicer_side == expected, "update ContrastiveSeg/Resources/requirements.txt from pyproject.toml"
    assert TORCH_REQUIREMENT == ">=" + engine["torch"]
