"""Colours for organs: anatomical where the organ is known, distinct otherwise.

Colours are RGB triples of ints 0-255 (the form ``colors.json`` stores).  The
same name always gets the same colour, so overlays, Slicer segments and
reports of different runs agree.  Name matching is tolerant: case, spaces,
dashes, word order and ``l``/``r`` abbreviations do not matter
(``"Kidney Left"``, ``"left_kidney"`` and ``"kidney_L"`` are one organ).
"""

from __future__ import annotations

import colorsys
import hashlib
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

RGB = Tuple[int, int, int]

# Adjacent organs (liver / right kidney / gallbladder, stomach / spleen /
# pancreas, aorta / heart / vena cava) get clearly different hues; paired
# organs get two shades of one hue.
_ORGAN_COLORS: Dict[str, RGB] = {
    "background": (0, 0, 0),
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "kidney": (244, 214, 49),
    "kidney_right": (244, 214, 49),
    "kidney_left": (250, 178, 40),
    "kidney_cyst_right": (190, 240, 90),
    "kidney_cyst_left": (150, 220, 70),
    "gallbladder": (111, 184, 80),
    "stomach": (85, 170, 235),
    "pancreas": (232, 120, 180),
    "duodenum": (255, 200, 150),
    "small_bowel": (230, 185, 160),
    "colon": (190, 140, 105),
    "esophagus": (211, 171, 143),
    "trachea": (182, 228, 255),
    "adrenal_gland": (249, 186, 150),
    "adrenal_gland_right": (249, 186, 150),
    "adrenal_gland_left": (238, 160, 120),
    "aorta": (230, 30, 30),
    "inferior_vena_cava": (0, 112, 192),
    "superior_vena_cava": (30, 80, 200),
    "portal_vein_and_splenic_vein": (0, 170, 210),
    "portal_vein": (0, 170, 210),
    "pulmonary_artery": (0, 110, 160),
    "pulmonary_vein": (120, 90, 200),
    "heart": (160, 30, 80),
    "lung": (172, 214, 230),
    "lung_right": (172, 214, 230),
    "lung_left": (150, 195, 225),
    "lung_upper_lobe_left": (150, 200, 230),
    "lung_lower_lobe_left": (110, 165, 215),
    "lung_upper_lobe_right": (170, 225, 210),
    "lung_middle_lobe_right": (135, 205, 190),
    "lung_lower_lobe_right": (100, 180, 165),
    "urinary_bladder": (215, 225, 90),
    "prostate": (230, 158, 140),
    "brain": (250, 250, 225),
    "spinal_cord": (255, 255, 180),
    "spine": (241, 214, 145),
    "vertebrae": (241, 214, 145),
    "sacrum": (230, 200, 130),
    "skull": (245, 230, 190),
    "sternum": (235, 215, 160),
    "rib": (225, 200, 150),
    "costal_cartilages": (200, 220, 200),
    "thyroid_gland": (200, 90, 60),
    "muscle": (170, 80, 80),
}

# Other spellings of the organs above (keys and values canonical).
_ALIASES: Dict[str, str] = {
    "kidneys": "kidney",
    "lungs": "lung",
    "bladder": "urinary_bladder",
    "gall_bladder": "gallbladder",
    "ivc": "inferior_vena_cava",
    "vena_cava_inferior": "inferior_vena_cava",
    "svc": "superior_vena_cava",
    "oesophagus": "esophagus",
    "bowel": "small_bowel",
    "small_intestine": "small_bowel",
    "large_bowel": "colon",
    "vertebra": "vertebrae",
    "spinal_column": "spine",
}

# Families: any name of the form <family>_<something> not listed above gets a
# shade of the family's colour (vertebrae_L1, rib_left_7, iliac_artery_left).
_FAMILIES: Dict[str, RGB] = {
    "vertebrae": (241, 214, 145),
    "vertebra": (241, 214, 145),
    "rib": (225, 200, 150),
    "iliac_artery": (220, 50, 50),
    "iliac_vena": (40, 90, 200),
    "common_carotid_artery": (220, 60, 60),
    "subclavian_artery": (210, 70, 70),
    "brachiocephalic_vein": (50, 100, 210),
    "humerus": (235, 215, 170),
    "scapula": (230, 205, 160),
    "clavicula": (225, 210, 165),
    "femur": (235, 220, 175),
    "hip": (228, 205, 150),
    "gluteus": (180, 85, 75),
    "iliopsoas": (190, 95, 85),
    "autochthon": (160, 75, 70),
    "muscle": (170, 80, 80),
}

_SIDE_WORDS = {"l": "left", "lt": "left", "r": "right", "rt": "right"}

# Well-separated colours for names that are not organs we know.
_FALLBACK_PALETTE: List[RGB] = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210),
    (219, 219, 141), (158, 218, 229), (174, 199, 232), (127, 127, 127), (199, 199, 199),
]


def _normalise(name: str) -> str:
    """Lower case, words joined by ``_``, ``l``/``r`` spelled out, side words last."""
    words = [w for w in re.split(r"[^0-9a-z]+", str(name).lower()) if w]
    words = [_SIDE_WORDS.get(w, w) for w in words]
    sides = [w for w in words if w in ("left", "right")]
    others = [w for w in words if w not in ("left", "right")]
    return "_".join(others + sides)


def _shade(base: RGB, key: str) -> RGB:
    """A deterministic variation of ``base`` (lightness and hue nudged by a hash of ``key``)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    h, lightness, s = colorsys.rgb_to_hls(*(c / 255.0 for c in base))
    lightness = min(0.9, max(0.25, lightness + (digest[0] / 255.0 - 0.5) * 0.3))
    h = (h + (digest[1] / 255.0 - 0.5) * 0.06) % 1.0
    return tuple(int(round(c * 255)) for c in colorsys.hls_to_rgb(h, lightness, s))  # type: ignore[return-value]


def _fallback(key: str, attempt: int = 0) -> RGB:
    """Palette colour chosen by a stable hash (not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{key}#{attempt}".encode("utf-8")).digest()
    if attempt == 0:
        return _FALLBACK_PALETTE[digest[0] % len(_FALLBACK_PALETTE)]
    hue = int.from_bytes(digest[:2], "big") / 65535.0
    lightness = 0.4 + digest[2] / 255.0 * 0.3
    return tuple(int(round(c * 255)) for c in colorsys.hls_to_rgb(hue, lightness, 0.75))  # type: ignore[return-value]


def organ_color(name: str) -> RGB:
    """Colour of one organ as ``(r, g, b)`` ints 0-255.

    Known organs (liver, spleen, kidneys, stomach, pancreas, gallbladder,
    aorta, vena cava, lungs and lobes, heart, bladder, vertebrae, ribs, ...)
    get an anatomical colour; other names a colour from a fixed palette picked
    by a stable hash of the name, so it is the same in every run.
    """
    key = _normalise(name)
    key = _ALIASES.get(key, key)
    if key in _ORGAN_COLORS:
        return _ORGAN_COLORS[key]
    for family in sorted(_FAMILIES, key=len, reverse=True):
        if key.startswith(family + "_"):
            return _shade(_FAMILIES[family], key)
    return _fallback(key)


def colors_for(names: Iterable[str]) -> Dict[str, RGB]:
    """``{name: (r, g, b)}`` for all ``names``, no two names sharing a colour.

    Each name gets :func:`organ_color` unless an earlier name in ``names``
    already has that colour; then it gets a deterministic alternative.
    """
    result: Dict[str, RGB] = {}
    used = set()
    for name in names:
        if name in result:
            continue
        color = organ_color(name)
        attempt = 1
        while color in used:
            color = _fallback(_normalise(name), attempt)
            attempt += 1
        used.add(color)
        result[name] = color
    return result


def to_unit_rgb(color: Sequence[float]) -> Tuple[float, float, float]:
    """A colour as floats 0-1, from either ints 0-255 or floats 0-1.

    If any component is above 1 the colour is taken as 0-255, otherwise as
    0-1 already (so ``(1, 0, 0)`` is red, and so is ``(255, 0, 0)``).
    """
    values = [float(c) for c in color][:3]
    if len(values) != 3:
        raise ValueError(f"a colour needs 3 components, got {color!r}")
    if any(v > 1.0 for v in values):
        values = [v / 255.0 for v in values]
    return tuple(min(1.0, max(0.0, v)) for v in values)  # type: ignore[return-value]


def to_rgb255(color: Sequence[float]) -> RGB:
    """A colour as ints 0-255, from either ints 0-255 or floats 0-1 (see :func:`to_unit_rgb`)."""
    return tuple(int(round(v * 255)) for v in to_unit_rgb(color))  # type: ignore[return-value]


def lookup(colors: Optional[Mapping[str, Sequence[float]]], name: str) -> Optional[Tuple[float, float, float]]:
    """``colors[name]`` as floats 0-1 (see :func:`to_unit_rgb`), names matched tolerantly; None if absent."""
    if not colors:
        return None
    if name in colors:
        return to_unit_rgb(colors[name])
    key = _normalise(name)
    for other, color in colors.items():
        if _normalise(other) == key:
            return to_unit_rgb(color)
    return None
