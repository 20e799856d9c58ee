"""Per-organ Dice between two segmentation nodes, as rows and as a ``vtkMRMLTableNode``.

Organs are matched by terminology (SNOMED CT codes) or canonical segment name
(so "Left kidney" matches ``kidney_left``); a model's organ it did not find is a
row with Dice 0.  Both segments of a pair are sampled on one common
grid (a chosen volume, or the reference segmentation's reference geometry), so
segmentations made on different grids are still compared voxel for voxel.
"""

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import vtk
from ContrastiveSegJob.labels import canonical_organ_name

from .segmentations import (
    model_organs,
    reference_geometry_volume,
    segment_ids,
    segment_mask,
    segment_names,
    segment_organ,
)
from .volumes import remove_node_and_storage, voxel_volume_ml

ORGAN_COLUMN = "Organ"
DICE_COLUMN = "Dice"
VOLUME_COLUMN = "Volume (mL)"
REFERENCE_VOLUME_COLUMN = "Reference volume (mL)"
DICE_TABLE_COLUMNS = (ORGAN_COLUMN, DICE_COLUMN, VOLUME_COLUMN, REFERENCE_VOLUME_COLUMN)


def dice_coefficient(mask: np.ndarray, reference: np.ndarray) -> float:
    """Dice = 2|A and B| / (|A| + |B|) of two boolean arrays; NaN when both are empty."""
    total = int(mask.sum()) + int(reference.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(mask, reference).sum()) / total


def dice_rows(scene, segmentation_node, reference_segmentation_node, reference_volume=None,
              include_unmatched: bool = False, organs: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    """Per-organ Dice and volumes of ``segmentation_node`` against ``reference_segmentation_node``.

    Segments are one organ when their terminology codes agree or, without codes,
    their canonical names (so "Left kidney" matches ``kidney_left``).  Every organ
    of the model that the reference has gets a row, with Dice 0 when the model
    found none of it (a prediction has segments only for the organs it found).

    Args:
        scene: the ``vtkMRMLScene``.
        segmentation_node: the segmentation to score (e.g. a prediction).
        reference_segmentation_node: the reference (e.g. a manual segmentation).
        reference_volume: the grid to compare on; by default the reference
            segmentation's reference geometry.
        include_unmatched: also list organs present in only one of the two
            (Dice 0, the missing volume 0).
        organs: the model's organs; by default those recorded on a predicted
            segmentation (:func:`ContrastiveSegMRML.segmentations.model_organs`).

    Returns:
        One dict per organ, the model's organs first, then the other segments of
        ``segmentation_node``: ``{"organ", "dice", "volume_ml", "reference_volume_ml"}``.
    """
    reference_by_key: Dict[str, str] = {}
    for segment_id in segment_ids(reference_segmentation_node):
        reference_by_key.setdefault(segment_organ(reference_segmentation_node, segment_id), segment_id)
    predicted_by_key: Dict[str, str] = {}
    for segment_id in segment_ids(segmentation_node):
        predicted_by_key.setdefault(segment_organ(segmentation_node, segment_id), segment_id)
    names = segment_names(segmentation_node)
    model = [canonical_organ_name(name) for name in (organs if organs is not None else model_organs(segmentation_node))]
    order = list(dict.fromkeys(model + list(predicted_by_key)))
    grid = reference_volume
    temporary_grid = None
    if grid is None:
        temporary_grid = grid = reference_geometry_volume(scene, reference_segmentation_node)
    try:
        voxel_ml = voxel_volume_ml(grid)
        rows: List[Dict[str, object]] = []
        for key in order:
            predicted_id = predicted_by_key.get(key)
            reference_id = reference_by_key.get(key)
            if reference_id is None and not include_unmatched:
                continue
            mask = None if predicted_id is None else segment_mask(scene, segmentation_node, predicted_id, grid)
            reference = None if reference_id is None else segment_mask(
                scene, reference_segmentation_node, reference_id, grid)
            if mask is not None and reference is not None:
                dice = dice_coefficient(mask, reference)
            else:
                dice = 0.0
            rows.append({"organ": names[predicted_id] if predicted_id is not None else key, "dice": dice,
                         "volume_ml": 0.0 if mask is None else float(mask.sum()) * voxel_ml,
                         "reference_volume_ml": 0.0 if reference is None else float(reference.sum()) * voxel_ml})
        if include_unmatched:
            reference_names = segment_names(reference_segmentation_node)
            for key, reference_id in reference_by_key.items():
                if key in order:
                    continue
                reference = segment_mask(scene, reference_segmentation_node, reference_id, grid)
                rows.append({"organ": reference_names[reference_id], "dice": 0.0,
                             "volume_ml": 0.0, "reference_volume_ml": float(reference.sum()) * voxel_ml})
        return rows
    finally:
        if temporary_grid is not None:
            remove_node_and_storage(scene, temporary_grid)


def dice_table(scene, segmentation_node, reference_segmentation_node, table_node=None,
               reference_volume=None, include_unmatched: bool = False, organs: Optional[Sequence[str]] = None):
    """Per-organ Dice of two segmentations as a ``vtkMRMLTableNode``.

    One row per organ of the model that the reference has (Dice 0 when the model
    missed it) and per other matched segment, columns ``Organ``, ``Dice``, ``Volume (mL)``
    (of ``segmentation_node``) and ``Reference volume (mL)``.  See :func:`dice_rows`
    for the arguments.  ``table_node`` is emptied and refilled when given, else a
    new table node named "<segmentation> Dice" is added to the scene.

    Returns:
        The table node.
    """
    rows = dice_rows(scene, segmentation_node, reference_segmentation_node, reference_volume, include_unmatched,
                     organs)
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{segmentation_node.GetName()} Dice")
    table_node.RemoveAllColumns()
    organ_column = vtk.vtkStringArray()
    organ_column.SetName(ORGAN_COLUMN)
    number_columns = []
    for column_name in DICE_TABLE_COLUMNS[1:]:
        column = vtk.vtkDoubleArray()
        column.SetName(column_name)
        number_columns.append(column)
    for row in rows:
        organ_column.InsertNextValue(str(row["organ"]))
        number_columns[0].InsertNextValue(float(row["dice"]))
        number_columns[1].InsertNextValue(float(row["volume_ml"]))
        number_columns[2].InsertNextValue(float(row["reference_volume_ml"]))
    table_node.AddColumn(organ_column)
    for column in number_columns:
        table_node.AddColumn(column)
    table_node.SetColumnDescription(DICE_COLUMN, "Dice similarity coefficient, 2|A and B| / (|A| + |B|)")
    table_node.SetColumnUnitLabel(VOLUME_COLUMN, "mL")
    table_node.SetColumnUnitLabel(REFERENCE_VOLUME_COLUMN, "mL")
    table_node.SetAttribute("ContrastiveSeg.Segmentation", segmentation_node.GetID() or "")
    table_node.SetAttribute("ContrastiveSeg.Reference", reference_segmentation_node.GetID() or "")
    table_node.Modified()
    return table_node


def read_dice_table(table_node) -> Dict[str, Dict[str, float]]:
    """``{organ: {"Dice": ..., "Volume (mL)": ..., "Reference volume (mL)": ...}}`` from a Dice table node."""
    table = table_node.GetTable()
    organs = table.GetColumnByName(ORGAN_COLUMN)
    result: Dict[str, Dict[str, float]] = {}
    for row in range(table.GetNumberOfRows()):
        values = {}
        for column_name in DICE_TABLE_COLUMNS[1:]:
            column = table.GetColumnByName(column_name)
            values[column_name] = float(column.GetValue(row))
        result[organs.GetValue(row)] = values
    return result


def format_dice(value: Optional[float]) -> str:
    """A Dice value for display: three decimals, "n/a" when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"
