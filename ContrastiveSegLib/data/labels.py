"""Label names: one canonical spelling, and label maps read from any convention.

Datasets name the same organ in different ways: "Liver" and "liver" (case,
spaces and dashes), but also "Left kidney" (TotalSegmentator's display name)
and ``kidney_left`` (its label name).  Training targets are chosen *by
canonical name*, so datasets whose label sets differ can be mixed: each keeps
its own values, and only names are compared.  The canonical name is the
TotalSegmentator label name where :data:`ORGAN_SYNONYMS` knows the organ.

The 3D Slicer module matches segment names with this same function (it imports
this file, which needs neither torch nor anything else outside the standard
library), so the engine and the module agree on what is one organ.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence, Union

from ..errors import InputError

BACKGROUND = "background"

# Organs that come in a left and a right one: TotalSegmentator names them <organ>_left / <organ>_right,
# other datasets and Slicer's terminology display names "Left kidney", "left_kidney", ...
_PAIRED_ORGANS = ("kidney", "lung", "adrenal_gland", "iliac_artery", "iliac_vena", "femur", "humerus", "hip",
                  "scapula", "clavicula", "gluteus_maximus", "gluteus_medius", "gluteus_minimus", "autochthon",
                  "iliopsoas", "kidney_cyst", "common_carotid_artery", "subclavian_artery", "brachiocephalic_vein",
                  "atrial_appendage", "lung_upper_lobe", "lung_lower_lobe")

# Other spellings (canonical form of the other spelling -> TotalSegmentator label name).
ORGAN_SYNONYMS: Dict[str, str] = {
    "gall_bladder": "gallbladder",
    "bladder": "urinary_bladder",
    "oesophagus": "esophagus",
    "ivc": "inferior_vena_cava",
    "vena_cava_inferior": "inferior_vena_cava",
    "svc": "superior_vena_cava",
    "vena_cava_superior": "superior_vena_cava",
    "small_intestine": "small_bowel",
    "large_intestine": "colon",
    "large_bowel": "colon",
    "portal_and_splenic_vein": "portal_vein_and_splenic_vein",
    "left_upper_lobe_of_lung": "lung_upper_lobe_left",
    "left_lower_lobe_of_lung": "lung_lower_lobe_left",
    "right_upper_lobe_of_lung": "lung_upper_lobe_right",
    "right_lower_lobe_of_lung": "lung_lower_lobe_right",
    "middle_lobe_of_right_lung": "lung_middle_lobe_right",
    "right_middle_lobe_of_lung": "lung_middle_lobe_right",
}
for _organ in _PAIRED_ORGANS:
    for _side in ("left", "right"):
        ORGAN_SYNONYMS[f"{_side}_{_organ}"] = f"{_organ}_{_side}"
        ORGAN_SYNONYMS[f"{_organ}_{_side[0]}"] = f"{_organ}_{_side}"


def canonical_name(name: str) -> str:
    """``" Kidney-Left "`` and ``"Left kidney"`` -> ``"kidney_left"``.

    Lower case, words joined by ``_``, then a known other spelling replaced by
    its TotalSegmentator label name (:data:`ORGAN_SYNONYMS`).
    """
    words = re.sub(r"[\s\-]+", "_", str(name).strip().lower()).strip("_")
    return ORGAN_SYNONYMS.get(words, words)


def parse_label_map(raw: Mapping, source: str) -> Dict[str, List[Union[int, str]]]:
    """A dataset's label map as ``{canonical name: [values]}``, background left out.

    Accepts both directions used in the field: MSD's ``{"0": "background",
    "1": "liver"}`` and nnU-Net v2's ``{"background": 0, "liver": 1}``.  A name
    mapped to a list of values means their union (nnU-Net region labels,
    ``"lung": [10, 11, 12, 13, 14]``).  For Slicer ``.seg.nrrd`` label files an
    entry may also name segments, alone or mixed with values
    (``"lung": ["right lung", "left lung"]``): names are kept as strings, after
    the values.  ``source`` names the file in errors.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise InputError("has no usable 'labels' map", path=source,
                         fix='add "labels": {"0": "background", "1": "liver", ...}')
    keys_are_values = all(_is_int(k) for k in raw)
    names: Dict[str, List[int]] = {}
    for key, value in raw.items():
        if keys_are_values:
            if not isinstance(value, str):
                raise InputError(f"label {key!r} maps to {value!r}, expected a name", path=source)
            name, values = canonical_name(value), [int(key)]
        else:
            name = canonical_name(key)
            values = _as_value_list(value, key, source)
        if name == BACKGROUND or values == [0]:
            continue
        if name in names:
            names[name] = _merge_entries(names[name], values)
        else:
            names[name] = values
    return names


def _merge_entries(first: Sequence[Union[int, str]], second: Sequence[Union[int, str]]) -> List[Union[int, str]]:
    """Label values (sorted) then segment names (in order), without repeats."""
    entries = list(first) + list(second)
    values = sorted({e for e in entries if isinstance(e, int)})
    segment_names = [e for e in dict.fromkeys(entries) if isinstance(e, str)]
    return values + segment_names


def _is_int(text) -> bool:
    try:
        int(text)
    except (TypeError, ValueError):
        return False
    return True


def _as_value_list(value: Union[int, str, Sequence[Union[int, str]]], key: str, source: str) -> List[Union[int, str]]:
    """An entry's label values (ints) and segment names (non-numeric strings), see :func:`parse_label_map`."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    entries: List[Union[int, str]] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            entries.append(int(item))
        elif isinstance(item, str) and _is_int(item):
            entries.append(int(item))
        elif isinstance(item, str) and item.strip():
            entries.append(item.strip())
        else:
            entries = []
            break
    if not entries:
        raise InputError(f"label {key!r} maps to {value!r}, expected label values (integers) or, for Slicer "
                         ".seg.nrrd labels, segment names", path=source,
                         fix=f'e.g. "{key}": [5, 6] or "{key}": ["right lung", "left lung"]')
    return _merge_entries([], entries)


def parse_target_names(text: Union[str, Sequence[str]]) -> List[str]:
    """``"liver, Spleen"`` -> ``["liver", "spleen"]`` (canonical, order kept, no repeats)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    names: List[str] = []
    for part in parts:
        name = canonical_name(part)
        if not name:
            continue
        if name == BACKGROUND:
            raise InputError("'background' cannot be a target: it is always class 0", path="--labels")
        if name not in names:
            names.append(name)
    if not names:
        raise InputError("no organ names given", path="--labels", fix="give e.g. --labels liver,spleen")
    return names


def output_label_map(target_names: Sequence[str]) -> Dict[str, str]:
    """The model's output classes as written to ``labels.json``: ``{"0": "background", "1": ...}``."""
    table = {"0": BACKGROUND}
    for index, name in enumerate(target_names, start=1):
        table[str(index)] = name
    return table
