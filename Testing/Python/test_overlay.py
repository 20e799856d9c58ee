"""The PNG overlay (report.overlay) and organ colours (report.colors)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ContrastiveSegLib.data.io import read_image, read_label_image
from ContrastiveSegLib.report.colors import colors_for, organ_color, to_rgb255, to_unit_rgb
from ContrastiveSegLib.report.overlay import overlay_size_px, save_overlay_png, to_lps_axes

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "ContrastiveSegLib" / "sample_data"
SAMPLE_NAMES = {int(k): v for k, v in json.loads((SAMPLE / "dataset.json").read_text())["labels"].items()}


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))


# --------------------------------------------------------------------------- overlay

def test_sample_overlay_png_one_and_two_rows(tmp_path):
    image = read_image(SAMPLE / "abdomen_ct.nii.gz")
    labels = read_label_image(SAMPLE / "abdomen_ct_labels.nii.gz").layers[0]
    ct = sitk.GetArrayFromImage(image)
    spacing = image.GetSpacing()[::-1]

    one = save_overlay_png(tmp_path / "pred.png", ct, labels, spacing, SAMPLE_NAMES, title="sample",
                           direction=image.GetDirection())
    assert one.stat().st_size > 10_000
    assert png_size(one) == overlay_size_px(1) == (1200, 450)

    reference = labels.copy()
    reference[reference == 6] = 0
    two = save_overlay_png(tmp_path / "both.png", ct, labels, spacing, SAMPLE_NAMES,
                           colors={"liver": (255, 0, 0)}, reference_zyx=reference, direction=image.GetDirection())
    assert png_size(two) == overlay_size_px(2) == (1200, 900)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.png", "pred.png"]


def test_axial_view_is_radiological_and_coronal_has_superior_up(tmp_path):
    # Identity direction: x to the patient's left, y to posterior, z to superior.
    ct = np.zeros((20, 40, 40), np.float32)
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[:, 2:10, 2:10] = 1      # patient's right, anterior: top left of the axial view
    labels[14:20, 2:10, 30:38] = 2  # superior, patient's left: top right of the coronal view
    path = save_overlay_png(tmp_path / "orientation.png", ct, labels, (1.0, 1.0, 1.0), {1: "a", 2: "b"},
                            colors={"a": (255, 0, 0), "b": (0, 0, 255)})
    pixels = read_png(path)[..., :3]
    grey = np.all(np.abs(pixels - pixels[..., :1]) < 0.02, axis=-1) & (pixels[..., 0] > 0.2)
    red = (pixels[..., 0] > 0.5) & (pixels[..., 1] < 0.4) & (pixels[..., 2] < 0.4)
    blue = (pixels[..., 2] > 0.5) & (pixels[..., 0] < 0.4) & (pixels[..., 1] < 0.4)
    width = pixels.shape[1]
    axial = np.zeros_like(grey)
    axial[:, : int(width * 0.36)] = True
    coronal = np.zeros_like(grey)
    coronal[:, int(width * 0.36): int(width * 0.70)] = True

    def box(mask):
        rows, cols = np.nonzero(mask)
        return rows.min(), rows.max(), cols.min(), cols.max()

    top, bottom, left, right = box(grey & axial | red & axial)
    red_rows, red_cols = np.nonzero(red & axial)
    assert red_rows.mean() < (top + bottom) / 2 and red_cols.mean() < (left + right) / 2
    top, bottom, left, right = box((grey | blue | red) & coronal)
    blue_rows, blue_cols = np.nonzero(blue & coronal)
    red_rows, red_cols = np.nonzero(red & coronal)
    assert red_cols.mean() < (left + right) / 2 and red_rows.max() > blue_rows.max()
    assert blue_rows.mean() < (top + bottom) / 2 and blue_cols.mean() > (left + right) / 2


def test_aspect_ratio_follows_the_spacing(tmp_path):
    ct = np.zeros((10, 20, 40), np.float32)
    labels = np.zeros((10, 20, 40), np.uint8)
    labels[5, 10, 20] = 1
    path = save_overlay_png(tmp_path / "aspect.png", ct, labels, (3.0, 2.0, 1.0), {1: "dot"})
    pixels = read_png(path)[..., :3]
    grey = np.all(np.abs(pixels - pixels[..., :1]) < 0.02, axis=-1) & (pixels[..., 0] > 0.2)
    grey[:, int(pixels.shape[1] * 0.36):] = False
    rows, cols = np.nonzero(grey)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    # The axial slice covers 40 mm x 40 mm (40 voxels of 1 mm by 20 of 2 mm): square on screen.
    assert height / width == pytest.approx(1.0, abs=0.05)


def test_to_lps_axes_undoes_flips_and_permutations():
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    flipped, spacing = to_lps_axes(array, (3.0, 2.0, 1.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    np.testing.assert_array_equal(flipped, array[:, ::-1, ::-1])
    assert spacing == (3.0, 2.0, 1.0)
    # itk x runs along world y, itk y along world x: swap the two last numpy axes.
    swapped, spacing = to_lps_axes(array, (3.0, 2.0, 1.0), (0, 1, 0, 1, 0, 0, 0, 0, 1))
    np.testing.assert_array_equal(swapped, array.transpose(0, 2, 1))
    assert spacing == (3.0, 1.0, 2.0)


def test_overlay_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match="shapes"):
        save_overlay_png(tmp_path / "x.png", np.zeros((2, 3, 4)), np.zeros((2, 3, 5)), (1, 1, 1), {})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- colours

def test_known_organs_get_their_colour_whatever_the_spelling():
    assert organ_color("liver") == organ_color("Liver") == organ_color(" LIVER ")
    assert organ_color("kidney_left") == organ_color("Kidney Left") == organ_color("left kidney") \
        == organ_color("kidney-L")
    assert organ_color("inferior vena cava") == organ_color("IVC")
    assert organ_color("kidney_left") != organ_color("kidney_right")
    assert organ_color("aorta")[0] > 200  # arteries are red
    for name in ("liver", "spleen", "stomach", "pancreas", "gallbladder", "lung", "heart", "urinary_bladder",
                 "vertebrae_L1", "rib_left_3", "something_unknown"):
        color = organ_color(name)
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)


def test_colors_are_deterministic_and_distinct():
    names = [name for value, name in sorted(SAMPLE_NAMES.items()) if value]
    first, second = colors_for(names), colors_for(names)
    assert first == second
    assert len(set(first.values())) == len(names)
    assert first["liver"] == organ_color("liver")
    assert colors_for(["a", "b", "a"]).keys() == {"a", "b"}


def test_colour_scales():
    assert to_unit_rgb((255, 0, 0)) == (1.0, 0.0, 0.0)
    assert to_unit_rgb((1.0, 0.5, 0.0)) == (1.0, 0.5, 0.0)
    assert to_rgb255((0.0, 0.5, 1.0)) == (0, 128, 255)
    with pytest.raises(ValueError):
        to_unit_rgb((1, 2))
