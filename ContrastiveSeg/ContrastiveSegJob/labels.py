"""Organ names and colours, shared by the GUI, the logic and the MRML glue.

Names are compared in *canonical* form with the engine's own rule
(``ContrastiveSegLib.data.labels.canonical_name``: lower case, words joined by
``_``, other spellings such as TotalSegmentator's "Left kidney" mapped to
``kidney_left``), so the module and the engine agree on what is one organ.
That file imports nothing outside the standard library (no torch): the module
imports it from the engine installed next to it, or from the top of a source
checkout.
"""

import colorsys
import importlib
import sys
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

BACKGROUND = "background"

# A label table as the user may hand it over: ``{"0": "background", "1": "liver"}``
# (labels.json / dataset.json style), ``{1: "liver"}``, or a list of names where
# position + 1 is the label value.
LabelTable = Union[Mapping, Sequence[str]]

# Colours (0-255) for organs users meet most often in abdominal CT.  Chosen to be
# told apart on a grey CT background; anything not listed gets a colour derived
# from its name, so the same organ always has the same colour.
KNOWN_ORGAN_COLORS: Dict[str, Tuple[int, int, int]] = {
    "liver": (220, 130, 100),
    "spleen": (155, 105, 165),
    "kidney_left": (185, 100, 80),
    "kidney_right": (200, 120, 90),
    "kidney": (190, 110, 85),
    "pancreas": (250, 210, 120),
    "stomach": (240, 170, 160),
    "gallbladder": (130, 190, 90),
    "aorta": (225, 50, 50),
    "inferior_vena_cava": (60, 95, 200),
    "esophagus": (210, 160, 130),
    "duodenum": (255, 190, 150),
    "small_bowel": (245, 185, 140),
    "colon": (205, 170, 110),
    "urinary_bladder": (220, 200, 60),
    "adrenal_gland_left": (250, 120, 170),
    "adrenal_gland_right": (240, 100, 150),
    "heart": (205, 60, 80),
    "lung_left": (120, 200, 230),
    "lung_right": (100, 180, 220),
}


def _engine_labels_module():
    """``ContrastiveSegLib.data.labels``; the source checkout's top folder is put on the path if needed."""
    try:
        return importlib.import_module("ContrastiveSegLib.data.labels")
    except ImportError:
        module_folder = Path(__file__).resolve().parents[1]
        for candidate in (module_folder, module_folder.parent):
            if (candidate / "ContrastiveSegLib" / "data" / "labels.py").is_file():
                sys.path.append(str(candidate))
                return importlib.import_module("ContrastiveSegLib.data.labels")
        raise


_ENGINE_LABELS = _engine_labels_module()


def canonical_organ_name(name: str) -> str:
    """``" Kidney-Left "`` and ``"Left kidney"`` -> ``"kidney_left"`` (the engine's ``canonical_name``)."""
    return _ENGINE_LABELS.canonical_name(name)


def normalize_label_table(label_names: Optional[LabelTable]) -> Dict[int, str]:
    """Any accepted label table as ``{label value: name}``, background (value 0) left out.

    ``{"0": "background", "1": "liver"}`` -> ``{1: "liver"}``;
    ``{"liver": 1}`` (nnU-Net style) -> ``{1: "liver"}``;
    ``["liver", "spleen"]`` -> ``{1: "liver", 2: "spleen"}``.
    Names keep the spelling given; compare them with :func:`canonical_organ_name`.
    """
    if label_names is None:
        return {}
    table: Dict[int, str] = {}
    if isinstance(label_names, Mapping):
        items = list(label_names.items())
        keys_are_values = all(_is_int(key) for key, _ in items)
        for key, value in items:
            if keys_are_values:
                label_value, name = int(key), str(value)
            elif _is_int(value):
                label_value, name = int(value), str(key)
            else:
                raise ValueError(f"label table entry {key!r}: {value!r} has no integer label value")
            if label_value == 0 or canonical_organ_name(name) == BACKGROUND:
                continue
            table[label_value] = name
        return dict(sorted(table.items()))
    if isinstance(label_names, str):
        label_names = parse_organ_list(label_names)
    for index, name in enumerate(label_names, start=1):
        table[index] = str(name)
    return table


def parse_organ_list(text: Union[str, Iterable[str]]) -> List[str]:
    """``"liver, Spleen ,liver"`` -> ``["liver", "spleen"]``: canonical names, order kept, no repeats."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    names: List[str] = []
    for part in parts:
        name = canonical_organ_name(part)
        if name and name != BACKGROUND and name not in names:
            names.append(name)
    return names


def organ_color(name: str, colors: Optional[Mapping[str, Sequence[float]]] = None) -> Tuple[int, int, int]:
    """The colour (0-255 RGB) of an organ: from ``colors`` (a run's colors.json) if it has it,
    else a known organ colour, else a stable colour derived from the name."""
    canonical = canonical_organ_name(name)
    if colors:
        for key, rgb in colors.items():
            if canonical_organ_name(key) == canonical:
                return tuple(int(round(float(c))) for c in list(rgb)[:3])  # type: ignore[return-value]
    if canonical in KNOWN_ORGAN_COLORS:
        return KNOWN_ORGAN_COLORS[canonical]
    # Hue from a checksum of the name (stable across runs and machines, unlike hash()).
    hue = (zlib.crc32(canonical.encode("utf-8")) % 360) / 360.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.55, 0.9)
    return int(red * 255), int(green * 255), int(blue * 255)


def _is_int(text) -> bool:
    if isinstance(text, bool):
        return False
    try:
        int(text)
    except (TypeError, ValueError):
        return False
    return True
