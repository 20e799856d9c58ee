"""The extension as the Slicer Extensions Index checks it, as far as that can be checked offline.

The Index (repository Slicer/ExtensionsIndex) validates a submitted ``ContrastiveSeg.json`` with
``scripts/check_description_files.py``: the JSON against the catalog-entry schema it names (v1.0.2
is the newest), LF line endings, the extension and repository names, the category, then it clones
the repository and reads the top-level ``CMakeLists.txt`` as text: the ``project()`` name must be
the JSON file's name, and the ``EXTENSION_ICONURL`` and ``EXTENSION_SCREENSHOTURLS`` strings are
downloaded and must be images. It also wants a licence file at the top and a checkout under 100 MB.
What needs the published repository (the downloads, the GitHub topic) is listed in
docs/extension-index.md for the maintainer.
"""

import json
import re
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "ContrastiveSeg"
CATALOG = REPO / f"{EXTENSION_NAME}.json"
TOP_CMAKE = REPO / "CMakeLists.txt"
PUBLISHING_DOC = REPO / "docs" / "extension-index.md"
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.2.json#")
# Catalog-entry schema v1.0.2: every field it allows (it allows no others) and its JSON type.
CATALOG_FIELD_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                       "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                       "enabled": bool, "tier": int}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
RAW_HOST = "https://raw.githubusercontent.com"
GITHUB_HOST = "https://github.com"


def files_that_may_name_the_repository() -> List[Path]:
    """Where the repository's URL can appear: the extension's metadata, the documentation, the module."""
    module = REPO / "ContrastiveSeg"
    return ([TOP_CMAKE, CATALOG, REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
            + sorted(module.rglob("*.py")) + sorted(module.rglob("*.ui")))


def catalog() -> dict:
    return json.loads(CATALOG.read_text(encoding="utf-8"))


def cmake_strings(text: str, variable: str) -> List[str]:
    """The quoted values of ``set(VARIABLE "...")`` read as the Index reads them: plain text, nothing
    expanded, and (for the screenshot URLs, so here for all) the closing bracket right after the quote."""
    return re.findall(r'set\s*\(\s*' + variable + r'\s+"([^"]*)"\)', text, re.IGNORECASE)


def cmake_value(variable: str) -> str:
    values = cmake_strings(TOP_CMAKE.read_text(encoding="utf-8"), variable)
    assert len(values) == 1, f"CMakeLists.txt must set {variable} once, to a quoted string (found {values})"
    return values[0]


def repository_of(url: str) -> Tuple[str, str]:
    """``(owner, name)`` of a ``https://github.com/owner/name`` URL."""
    parts = urlsplit(url.strip().rstrip("/"))
    path = [part for part in parts.path.split("/") if part]
    assert parts.scheme == "https" and parts.netloc == "github.com" and len(path) == 2, \
        f"{url!r} is not https://github.com/OWNER/NAME"
    return path[0], path[1][:-4] if path[1].endswith(".git") else path[1]


def png_size(path: Path) -> Tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def downloaded_files() -> Dict[str, Path]:
    """URL -> file in this repository, for every URL of CMakeLists.txt that the Index downloads."""
    owner, name = repository_of(cmake_value("EXTENSION_HOMEPAGE"))
    branch = catalog().get("scm_revision", "main")
    prefix = f"{RAW_HOST}/{owner}/{name}/{branch}/"
    urls = [cmake_value("EXTENSION_ICONURL")] + cmake_value("EXTENSION_SCREENSHOTURLS").split()
    files = {}
    for url in urls:
        assert url.startswith(prefix), (
            f"{url} is not a file of the repository in EXTENSION_HOMEPAGE at scm_revision {branch!r}: "
            f"it must start with {prefix}")
        files[url] = REPO / url[len(prefix):]
    return files


def test_catalog_entry_follows_the_index_schema():
    raw = CATALOG.read_bytes()
    assert b"\r" not in raw, f"{CATALOG.name} must have LF line endings only (the Index rejects CR)"
    entry = catalog()
    assert CATALOG_REQUIRED <= set(entry), f"{CATALOG.name} lacks {sorted(CATALOG_REQUIRED - set(entry))}"
    unknown = sorted(set(entry) - set(CATALOG_FIELD_TYPES))
    assert not unknown, f"{CATALOG.name}: fields the schema does not allow: {unknown}"
    for field, value in entry.items():
        expected = CATALOG_FIELD_TYPES[field]
        # JSON true/false are Python bools, which are also ints: an integer field must not hold one.
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        assert ok, f"{CATALOG.name}: {field} must be a JSON {expected.__name__}, not {value!r}"
    assert entry["$schema"] == SCHEMA_URL
    assert all(isinstance(item, str) and item for item in entry.get("build_dependencies", []))
    assert entry.get("scm_type", "git") in ("git", "local")
    assert 1 <= entry.get("tier", 1) <= 5


def test_names_follow_the_index_rules():
    entry = catalog()
    project = re.search(r"^\s*project\s*\(\s*([^\s)]+)", TOP_CMAKE.read_text(encoding="utf-8"), re.M | re.I)
    assert project and project.group(1) == CATALOG.stem == EXTENSION_NAME, \
        "the catalog file must be named after the CMake project()"
    assert not EXTENSION_NAME.lower().startswith("slicer"), "the extension name must not start with 'Slicer'"
    assert urlsplit(entry["scm_url"]).scheme in ("https", "git")
    _, name = repository_of(entry["scm_url"])
    assert name.startswith("Slicer"), f"the repository name must start with 'Slicer', not {name!r}"
    assert entry["category"] == "Segmentation"  # one of the Index's accepted categories


def test_cmake_extension_fields_agree_with_the_catalog():
    entry = catalog()
    assert cmake_value("EXTENSION_HOMEPAGE").rstrip("/") == entry["scm_url"].rstrip("/"), \
        "EXTENSION_HOMEPAGE and scm_url in ContrastiveSeg.json must name the same repository"
    assert cmake_value("EXTENSION_CATEGORY") == entry["category"]
    assert cmake_value("EXTENSION_DEPENDS").split() == entry.get("build_dependencies", []) == ["PyTorch"], \
        "torch comes only through the PyTorch extension, in both files"
    description = cmake_value("EXTENSION_DESCRIPTION")
    assert 40 < len(description) < 600
    assert (REPO / "LICENSE.txt").is_file(), "the Index wants a licence file at the top of the repository"


def test_contributors_are_in_the_form_the_index_shows():
    contributors = cmake_value("EXTENSION_CONTRIBUTORS")
    # "Name (Affiliation), Name (Affiliation)": names without commas or brackets, affiliation optional.
    entry = r"[^,()]+?(?: \([^()]+\))?"
    assert re.fullmatch(rf"{entry}(?:, {entry})*", contributors), contributors
    assert not re.search(r"placeholder|todo|john doe|jane doe|your name|example", contributors, re.I)
    assert contributors == "ContrastiveSeg contributors"
    module_sources = "\n".join(path.read_text(encoding="utf-8") for path in (REPO / "ContrastiveSeg").rglob("*.py")
                               if "Scripts" not in path.parts)
    in_module = re.findall(r"contributors\s*=\s*\[([^\]]*)\]", module_sources)
    assert in_module, "the module sets parent.contributors"
    for listed in in_module:
        assert ", ".join(re.findall(r'"([^"]*)"', listed)) == contributors, \
            "the module's About box and the Extensions Manager must name the same contributors"


def test_icon_and_screenshot_urls_point_to_pngs_in_this_repository():
    files = downloaded_files()
    icon_url = cmake_value("EXTENSION_ICONURL")
    assert files[icon_url].is_file(), f"{icon_url}: {files[icon_url].relative_to(REPO)} does not exist"
    assert png_size(files[icon_url]) == (128, 128), "the extension icon must be a 128x128 PNG"
    screenshots = [url for url in files if url != icon_url]
    assert screenshots, "EXTENSION_SCREENSHOTURLS names no screenshot"
    for url in screenshots:
        path = files[url]
        assert path.is_file(), f"{url}: {path.relative_to(REPO)} does not exist"
        width, height = png_size(path)
        assert width >= 800 and height >= 400, f"{path.relative_to(REPO)} is {width}x{height}: too small to read"


def test_downloaded_files_are_committed():
    """The Index clones the repository: a file that git does not track is not there."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for url, path in downloaded_files().items():
        relative = path.relative_to(REPO).as_posix()
        listed = subprocess.run(["git", "ls-files", "--error-unmatch", relative], cwd=REPO,
                                capture_output=True, text=True)
        assert listed.returncode == 0, f"{relative} ({url}) is not committed"


def test_module_and_top_level_icons_are_128_pixel_pngs():
    assert png_size(REPO / "Resources" / "ContrastiveSeg.png") == (128, 128)
    assert png_size(REPO / "ContrastiveSeg" / "Resources" / "Icons" / "ContrastiveSeg.png") == (128, 128)


def test_every_mention_of_the_repository_names_the_same_one():
    """Publishing changes the owner/name in a few files; a mention left behind would point elsewhere."""
    owner, name = repository_of(cmake_value("EXTENSION_HOMEPAGE"))
    texts = files_that_may_name_the_repository()
    pattern = re.compile(r"(?:github\.com|raw\.githubusercontent\.com)/([\w.-]+)/(Slicer[\w.-]*?)(?:\.git)?(?=[/\s\"'>)#]|$)")
    wrong = []
    for path in texts:
        for found_owner, found_name in pattern.findall(path.read_text(encoding="utf-8")):
            if found_name.lower() == name.lower() and (found_owner, found_name) != (owner, name):
                wrong.append(f"{path.relative_to(REPO)}: {found_owner}/{found_name}")
    assert not wrong, f"these name another repository than EXTENSION_HOMEPAGE ({owner}/{name}): {wrong}"


def test_publishing_steps_name_every_file_that_holds_the_repository():
    owner, name = repository_of(cmake_value("EXTENSION_HOMEPAGE"))
    steps = PUBLISHING_DOC.read_text(encoding="utf-8")
    holders = [path.relative_to(REPO).as_posix() for path in files_that_may_name_the_repository()
               if f"{owner}/{name}" in path.read_text(encoding="utf-8") and path != PUBLISHING_DOC]
    assert holders, f"no file names {owner}/{name}"
    missing = [path for path in holders if path not in steps]
    assert not missing, f"{PUBLISHING_DOC.name} must list every file to change when publishing; missing {missing}"
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "scm_url", "scm_revision"):
        assert variable in steps, f"{PUBLISHING_DOC.name} must say what to do with {variable}"


def test_checkout_is_under_the_index_size_limit():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    paths = [REPO / item for item in listed.decode("utf-8").split("\0") if item]
    total = sum(path.stat().st_size for path in paths if path.is_file())
    assert total < 100 * 1024 * 1024, f"the committed files are {total / 2**20:.1f} MiB; the Index allows 100 MB"
