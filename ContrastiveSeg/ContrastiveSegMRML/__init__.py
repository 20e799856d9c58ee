"""MRML glue of the ContrastiveSeg module: everything that touches scene nodes but needs no Qt.

It imports only Slicer's MRML and logic classes (``slicer.vtkMRML*``,
``slicer.vtkSlicerSegmentationsModuleLogic``), ``vtk`` and numpy, so it runs
inside Slicer and, in CI, against the ``slicer-core`` package.
"""

from .datasets import export_scene_pairs_to_dataset, scene_pair_export_steps
from .dice import (
    DICE_TABLE_COLUMNS,
    dice_coefficient,
    dice_rows,
    dice_table,
    format_dice,
    read_dice_table,
)
from .segmentations import (
    export_segmentation_to_labelmap,
    find_segment_id,
    import_labelmap_as_segmentation,
    labelmap_export_steps,
    load_segmentation_file,
    model_organs,
    reference_geometry_volume,
    save_segmentation_file,
    segment_ids,
    segment_mask,
    segment_names,
    segment_organ,
    segment_voxel_counts,
)
from .volumes import (
    array_from_volume,
    engine_readable_file,
    read_volume,
    remove_node_and_storage,
    update_volume_from_array,
    voxel_volume_ml,
    write_volume,
)

__all__ = [
    "DICE_TABLE_COLUMNS",
    "array_from_volume",
    "dice_coefficient",
    "dice_rows",
    "dice_table",
    "export_scene_pairs_to_dataset",
    "export_segmentation_to_labelmap",
    "find_segment_id",
    "format_dice",
    "import_labelmap_as_segmentation",
    "labelmap_export_steps",
    "load_segmentation_file",
    "model_organs",
    "read_dice_table",
    "read_volume",
    "reference_geometry_volume",
    "remove_node_and_storage",
    "save_segmentation_file",
    "segment_ids",
    "segment_mask",
    "segment_names",
    "segment_organ",
    "segment_voxel_counts",
    "scene_pair_export_steps",
    "engine_readable_file",
    "update_volume_from_array",
    "voxel_volume_ml",
    "write_volume",
]
