"""Organ identity in Slicer's terminology: SNOMED CT codes, as Slicer's Terminologies module writes them.

A segment's ``TerminologyEntry`` tag holds seven ``~``-separated parts:
context ~ category ~ type ~ type modifier ~ anatomic context ~ anatomic region ~
region modifier, each code as ``scheme^value^meaning``, e.g. TotalSegmentator's
left kidney::

    Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~
    SCT^64033007^Kidney~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^

Two segments are one organ when their type code and modifier code agree,
whatever their names.  :func:`terminology_entry` gives result segments that
identity; :func:`organ_from_terminology` reads it back as the canonical organ
name.  No Qt and no Slicer here.
"""

from typing import Dict, Optional, Tuple

CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
LEFT = ("SCT", "7771000", "Left")
RIGHT = ("SCT", "24028007", "Right")

# canonical organ name -> (SNOMED CT type code, meaning, side modifier or None); the codes TotalSegmentator
# and Slicer's DICOM master list use.
ORGAN_CODES: Dict[str, Tuple[str, str, Optional[Tuple[str, str, str]]]] = {
    "liver": ("10200004", "Liver", None),
    "spleen": ("78961009", "Spleen", None),
    "kidney_left": ("64033007", "Kidney", LEFT),
    "kidney_right": ("64033007", "Kidney", RIGHT),
    "gallbladder": ("28231008", "Gallbladder", None),
    "stomach": ("69695003", "Stomach", None),
    "pancreas": ("15776009", "Pancreas", None),
    "aorta": ("15825003", "Aorta", None),
    "inferior_vena_cava": ("64131007", "Inferior vena cava", None),
    "portal_vein_and_splenic_vein": ("32764006", "Portal vein", None),
    "adrenal_gland_left": ("23451007", "Adrenal gland", LEFT),
    "adrenal_gland_right": ("23451007", "Adrenal gland", RIGHT),
    "esophagus": ("32849002", "Esophagus", None),
    "trachea": ("44567001", "Trachea", None),
    "duodenum": ("38848004", "Duodenum", None),
    "small_bowel": ("30315005", "Small Intestine", None),
    "colon": ("71854001", "Colon", None),
    "heart": ("80891009", "Heart", None),
    "lung_upper_lobe_left": ("45653009", "Upper lobe of lung", LEFT),
    "lung_lower_lobe_left": ("90572001", "Lower lobe of lung", LEFT),
    "lung_upper_lobe_right": ("45653009", "Upper lobe of lung", RIGHT),
    "lung_middle_lobe_right": ("72481006", "Middle lobe of right lung", None),
    "lung_lower_lobe_right": ("90572001", "Lower lobe of lung", RIGHT),
    "pulmonary_artery": ("81040000", "Pulmonary artery", None),
    "brain": ("12738006", "Brain", None),
    "iliac_artery_left": ("73634005", "Common iliac artery", LEFT),
    "iliac_artery_right": ("73634005", "Common iliac artery", RIGHT),
    "iliac_vena_left": ("46027005", "Common iliac vein", LEFT),
    "iliac_vena_right": ("46027005", "Common iliac vein", RIGHT),
    "vertebrae_l1": ("66794005", "L1 vertebra", None),
    "vertebrae_l2": ("14293000", "L2 vertebra", None),
    "vertebrae_l3": ("36470004", "L3 vertebra", None),
    "vertebrae_l4": ("11994002", "L4 vertebra", None),
    "vertebrae_l5": ("49668003", "L5 vertebra", None),
    "vertebrae_t12": ("23215003", "T12 vertebra", None),
    "vertebrae_t11": ("12989004", "T11 vertebra", None),
    "vertebrae_t10": ("7610001", "T10 vertebra", None),
}
_ORGAN_BY_CODES = {(code, modifier[1] if modifier else ""): organ
                   for organ, (code, _meaning, modifier) in ORGAN_CODES.items()}


def _code(parts: Tuple[str, str, str]) -> str:
    return "^".join(parts)


def terminology_entry(organ: str) -> Optional[str]:
    """The ``TerminologyEntry`` string of a canonical organ name, or None for an organ without codes."""
    known = ORGAN_CODES.get(organ)
    if known is None:
        return None
    code, meaning, modifier = known
    return "~".join([CONTEXT, _code(ANATOMICAL_STRUCTURE), _code(("SCT", code, meaning)),
                     _code(modifier) if modifier else "^^", ANATOMIC_CONTEXT, "^^", "^^"])


def organ_from_terminology(entry: Optional[str]) -> Optional[str]:
    """The canonical organ a ``TerminologyEntry`` string names (by its type and modifier codes), or None."""
    if not entry:
        return None
    parts = str(entry).split("~")
    if len(parts) < 4:
        return None
    type_code = parts[2].split("^")
    modifier_code = parts[3].split("^")
    if len(type_code) < 2 or not type_code[1]:
        return None
    modifier = modifier_code[1] if len(modifier_code) >= 2 else ""
    return _ORGAN_BY_CODES.get((type_code[1], modifier))
