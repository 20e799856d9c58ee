"""A PNG picture of a segmentation: axial and coronal slices with coloured organs.

Radiological convention: the axial view is seen from the feet (patient's
right on the left of the picture, anterior at the top); the coronal view is
seen from the front (patient's right on the left, superior at the top).
Pixels are drawn with their true physical aspect ratio.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..data.io import PathLike, atomic_output
from .colors import colors_for, lookup, to_unit_rgb

DPI = 100
FIGURE_WIDTH_IN = 12.0
ROW_HEIGHT_IN = 4.5
LABEL_ALPHA = 0.45


def overlay_size_px(rows: int) -> Tuple[int, int]:
    """``(width, height)`` in pixels of the PNG :func:`save_overlay_png` writes with ``rows`` rows."""
    return int(round(FIGURE_WIDTH_IN * DPI)), int(round(ROW_HEIGHT_IN * rows * DPI))


def to_lps_axes(array_zyx: np.ndarray, spacing_zyx: Sequence[float],
                direction: Sequence[float]) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """Flip / transpose a ``(z, y, x)`` array so its axes point to superior, posterior, left.

    Args:
        array_zyx: voxels as ``sitk.GetArrayFromImage`` gives them.
        spacing_zyx: mm per array axis.
        direction: the image's ``GetDirection()`` (9 values, row-major, LPS).

    Returns:
        The array with axes (S, P, L) (a view when possible) and its spacing.
        Oblique directions are snapped to the nearest axis.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    # itk axis i (x=0, y=1, z=2) is numpy axis 2 - i; its world axis is the largest component.
    world_of_itk = [int(np.argmax(np.abs(matrix[:, i]))) for i in range(3)]
    if sorted(world_of_itk) != [0, 1, 2]:
        raise ValueError(f"direction {tuple(direction)} does not map the axes one-to-one")
    sign_of_itk = [np.sign(matrix[world_of_itk[i], i]) for i in range(3)]
    order, flips, spacing = [], [], []
    for target in range(3):  # numpy axis 0 = world z (S), 1 = world y (P), 2 = world x (L)
        world = 2 - target
        itk_axis = world_of_itk.index(world)
        order.append(2 - itk_axis)
        flips.append(sign_of_itk[itk_axis] < 0)
        spacing.append(float(spacing_zyx[2 - itk_axis]))
    result = np.transpose(array_zyx, order)
    for axis, flip in enumerate(flips):
        if flip:
            result = np.flip(result, axis=axis)
    return result, (spacing[0], spacing[1], spacing[2])


def _centre(labels: Sequence[Optional[np.ndarray]], shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """Centre of mass (rounded) of the labelled voxels of all given maps, else the volume centre."""
    mask = np.zeros(shape, dtype=bool)
    for array in labels:
        if array is not None:
            mask |= array > 0
    if not mask.any():
        return tuple(s // 2 for s in shape)  # type: ignore[return-value]
    coordinates = [np.arange(s) for s in shape]
    total = mask.sum()
    centre = []
    for axis, coordinate in enumerate(coordinates):
        other = tuple(a for a in range(3) if a != axis)
        centre.append(int(round(float((mask.sum(axis=other) * coordinate).sum() / total))))
    return centre[0], centre[1], centre[2]


def _add_fitting_legend(figure, handles: list, left: float) -> None:
    """A legend right of ``left`` (figure fraction) in the largest font, 9 pt down to 5, that fits."""
    renderer = figure.canvas.get_renderer()
    width, height = figure.bbox.width, figure.bbox.height
    legend = None
    for font in (9, 8, 7, 6, 5):
        rows_fit = max(1, int(height * 0.94 / (font * DPI / 72 * 1.45)))
        columns = math.ceil(len(handles) / rows_fit)
        if legend is not None:
            legend.remove()
        legend = figure.legend(handles=handles, loc="center left", bbox_to_anchor=(left, 0.5), ncol=columns,
                               fontsize=font, frameon=False, labelcolor="white", handlelength=1.2,
                               handletextpad=0.5, columnspacing=0.8, labelspacing=0.3, borderaxespad=0.1)
        box = legend.get_window_extent(renderer)
        if box.x1 <= width - 2 and box.height <= height:
            return


def save_overlay_png(path: PathLike, image_zyx: np.ndarray, labels_zyx: np.ndarray, spacing_zyx: Sequence[float],
                     names: Mapping[int, str], colors: Optional[Mapping[str, Sequence[float]]] = None,
                     title: Optional[str] = None, reference_zyx: Optional[np.ndarray] = None,
                     window: Tuple[float, float] = (-150, 250),
                     direction: Optional[Sequence[float]] = None) -> Path:
    """Save an axial and a coronal slice of a CT with its labels as a PNG, atomically.

    The slices pass through the centre of mass of the labelled voxels
    (prediction and reference together).  The PNG is
    :func:`overlay_size_px` pixels (1200 x 450 per row).

    Args:
        path: the ``.png`` to write.
        image_zyx: CT intensities ``(z, y, x)`` (HU).
        labels_zyx: integer labels, same shape.
        spacing_zyx: voxel size in mm per array axis (``image.GetSpacing()[::-1]``).
        names: label value -> organ name (value 0 is background).
        colors: organ name -> ``(r, g, b)`` ints 0-255 (or floats 0-1); others
            from :func:`~ContrastiveSegLib.report.colors.colors_for`.
        title: text above the figure.
        reference_zyx: reference labels with the same values and grid; adds a
            second row (prediction on top, reference below).
        window: CT grey-level window ``(lowest, highest)`` in HU.
        direction: ``GetDirection()`` of the image the arrays came from.  When
            given, the arrays are reoriented first; when None they must already
            have axes pointing to (superior, posterior, left), i.e. come from
            an image with identity direction (see :func:`to_lps_axes`).

    Returns:
        ``path`` as a ``Path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = np.asarray(image_zyx, dtype=np.float32)
    labels = np.asarray(labels_zyx)
    reference = None if reference_zyx is None else np.asarray(reference_zyx)
    if image.ndim != 3 or labels.shape != image.shape or (reference is not None and reference.shape != image.shape):
        raise ValueError(f"image {image.shape}, labels {labels.shape} and reference "
                         f"{None if reference is None else reference.shape} must be equal 3D shapes")
    spacing = tuple(float(s) for s in spacing_zyx)
    if direction is not None:
        image, new_spacing = to_lps_axes(image, spacing, direction)
        labels, _ = to_lps_axes(labels, spacing, direction)
        if reference is not None:
            reference, _ = to_lps_axes(reference, spacing, direction)
        spacing = new_spacing
    sz, sy, sx = spacing
    cz, cy, _ = _centre([labels, reference], image.shape)

    # One colour per named value; values present without a name still get one.
    value_names: Dict[int, str] = {int(v): str(n) for v, n in names.items() if int(v) != 0}
    present = set(int(v) for v in np.unique(labels)) | (set(int(v) for v in np.unique(reference))
                                                         if reference is not None else set())
    for value in sorted(present - {0} - set(value_names)):
        value_names[value] = f"label {value}"
    palette = colors_for(list(value_names.values()))
    color_of = {value: lookup(colors, name) or to_unit_rgb(palette[name])
                for value, name in value_names.items()}
    highest = max([0] + list(value_names) + [int(labels.max())] + ([int(reference.max())] if reference is not None else []))
    lut = np.zeros((highest + 1, 4), dtype=np.float32)
    for value, rgb in color_of.items():
        lut[value] = (*rgb, LABEL_ALPHA)

    rows: List[Tuple[str, np.ndarray]] = [("Prediction" if reference is not None else "", labels)]
    if reference is not None:
        rows.append(("Reference", reference))

    width_px, height_px = overlay_size_px(len(rows))
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor="black")
    FigureCanvasAgg(figure)
    top = 1.0 - (0.55 if title else 0.3) / (ROW_HEIGHT_IN * len(rows))
    grid = figure.add_gridspec(len(rows), 2, left=0.02, right=0.70, top=top, bottom=0.03, wspace=0.06, hspace=0.18)
    low, high = window
    shown: set = set()
    text_style = dict(color="white", fontsize=9)
    for row, (row_name, row_labels) in enumerate(rows):
        axial_image, axial_labels = image[cz], row_labels[cz]                    # rows: y (A at top), cols: x (R left)
        coronal_image, coronal_labels = image[:, cy, :], row_labels[:, cy, :]    # rows: z, flipped so S is at top
        panels = [
            ("axial", axial_image, axial_labels, sy / sx, "upper", f"slice {cz + 1} of {image.shape[0]}",
             ("A", "P", "R", "L")),
            ("coronal", coronal_image, coronal_labels, sz / sx, "lower", f"slice {cy + 1} of {image.shape[1]}, from the front",
             ("S", "I", "R", "L")),
        ]
        for column, (view, grey, lab, aspect, origin, where, marks) in enumerate(panels):
            axes = figure.add_subplot(grid[row, column])
            axes.set_facecolor("black")
            axes.imshow(grey, cmap="gray", vmin=low, vmax=high, aspect=aspect, origin=origin,
                        interpolation="nearest")
            axes.imshow(lut[np.clip(lab, 0, highest)], aspect=aspect, origin=origin, interpolation="nearest")
            shown.update(int(v) for v in np.unique(lab) if v != 0)
            heading = f"{row_name}: {view}" if row_name else view.capitalize()
            axes.set_title(f"{heading} ({where})", **text_style)
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_visible(False)
            top_mark, bottom_mark, left_mark, right_mark = marks
            axes.text(0.5, 0.98, top_mark, transform=axes.transAxes, ha="center", va="top", **text_style)
            axes.text(0.5, 0.02, bottom_mark, transform=axes.transAxes, ha="center", va="bottom", **text_style)
            axes.text(0.01, 0.5, left_mark, transform=axes.transAxes, ha="left", va="center", **text_style)
            axes.text(0.99, 0.5, right_mark, transform=axes.transAxes, ha="right", va="center", **text_style)

    legend_values = sorted(shown, key=lambda v: value_names[v])
    if legend_values:
        handles = [Patch(facecolor=color_of[v], edgecolor="none", label=value_names[v]) for v in legend_values]
        _add_fitting_legend(figure, handles, left=0.715)
    if title:
        figure.suptitle(title, color="white", fontsize=12, y=1.0 - 0.12 / (ROW_HEIGHT_IN * len(rows)), va="top")

    path = Path(path)
    with atomic_output(path) as temporary:
        figure.savefig(str(temporary), format="png", dpi=DPI, facecolor=figure.get_facecolor())
    return path
