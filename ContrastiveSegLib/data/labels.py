"""Label names: one canonical spelling, and label maps read from any convention.

Datasets name the same organ in different ways ("Liver", "liver", "left kidney"
vs "kidney_left" are left to the user, but case, spaces and dashes are not).
Training targets are chosen *by canonical name*, so datasets whose label sets
differ can be mixed: each keeps its own values, and only names are compared.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence, Union

from ..errors import InputError

BACKGROUND = "background"


def canonical_name(name: str) -> str:
    """``" Kidney-Left "`` -> ``"kidney_left"``: lower case, words joined by ``_``."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower()).strip("_")


def parse_label_map(raw: Mapping, source: str) -> Dict[str, List[int]]:
    """A dataset's label map as ``{canonical name: [values]}``, background left out.

    Accepts both directions used in the field: MSD's ``{"0": "background",
    "1": "liver"}`` and nnU-Net v2's ``{"background": 0, "liver": 1}``.  A name
    mapped to a list of values means their union (nnU-Net region labels,
    ``"lung": [10, 11, 12, 13, 14]``).  ``source`` names the file in errors.
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
            names[name] = sorted(set(names[name]) | set(values))
        else:
            names[name] = values
    return names


def _is_int(text) -> bool:
    try:
        int(text)
    except (TypeError, ValueError):
        return False
    return True


def _as_value_list(value: Union[int, Sequence[int]], key: str, source: str) -> List[int]:
    if isinstance(value, bool):
        raise InputError(f"label {key!r} maps to {value!r}, expected an integer or a list of integers",
                         path=source)
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        return sorted(set(int(v) for v in value))
    if isinstance(value, str) and _is_int(value):
        return [int(value)]
    raise InputError(f"label {key!r} maps to {value!r}, expected an integer or a list of integers",
                     path=source)


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
