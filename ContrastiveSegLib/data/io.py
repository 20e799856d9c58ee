"""Reading and writing medical images and label maps.

Array convention used everywhere in the engine: a numpy array in SimpleITK
order ``(z, y, x)`` (``sitk.GetArrayFromImage``), always kept together with the
``SimpleITK.Image`` that carries its geometry (spacing, origin and direction,
in ITK's LPS physical space).  Sizes and spacings reported by SimpleITK are in
``(x, y, z)`` order; the arrays are ``(z, y, x)``.

Every problem a user can fix raises :class:`~ContrastiveSegLib.errors.InputError`
naming the file.  Every writer is atomic: it writes a temporary file in the
destination folder and renames it, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .integrity import check_nifti_file, check_slice_spacing, is_nifti, unreadable_dicom_files

PathLike = Union[str, "os.PathLike[str]"]

READ_FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a folder holding a DICOM series"
WRITE_FORMATS = ".nii.gz, .nii, .nrrd, .mha (and .seg.nrrd for label maps)"
_WRITE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
_MULTI_SUFFIXES = (".seg.nrrd", ".seg.nhdr", ".nii.gz")

GRID_FIX = ("resample the label onto the image grid, e.g. in 3D Slicer with Resample Scalar/Vector/DWI "
            "Volume, or export it from Slicer with the image as reference")


# --------------------------------------------------------------------------- label containers

@dataclass
class SegmentInfo:
    """One named structure of a label file.

    Attributes:
        name: the structure's name, e.g. ``"liver"``.
        label_value: the voxel value that marks it in its layer (> 0).
        layer: index into :attr:`LabelImage.layers` (0 for plain label maps).
        color: ``(r, g, b)`` floats 0-1, or None when the file has none.
        id: the Slicer segment ID (``Segment_1``), or None.
        tags: Slicer segment tags (terminology, status), ``{}`` when none.
    """

    name: str
    label_value: int
    layer: int = 0
    color: Optional[Tuple[float, float, float]] = None
    id: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class LabelImage:
    """A label file read into memory.

    Attributes:
        image: a 3D ``sitk.Image`` (int32) holding layer 0, and the geometry of all layers.
        layers: one int32 array ``(z, y, x)`` per layer; a plain label map has one
            layer, a Slicer ``.seg.nrrd`` with overlapping segments has several.
        segments: the named segments stored in the file (``.seg.nrrd``); an empty
            list for a plain label map, whose names come from elsewhere
            (``dataset.json``, ``labels.json``).
        path: the file it was read from.
    """

    image: sitk.Image
    layers: List[np.ndarray]
    segments: List[SegmentInfo] = field(default_factory=list)
    path: Optional[str] = None

    def values(self) -> Set[int]:
        """The non-zero label values present in any layer."""
        present: Set[int] = set()
        for layer in self.layers:
            present.update(_nonzero_values(layer))
        return present

    def segment_table(self, names: Optional[Dict[int, str]] = None) -> List[SegmentInfo]:
        """The file's own segments, or, for a plain label map, one segment per entry of ``names``.

        ``names`` maps label value -> name (value 0, the background, is left out).
        """
        if self.segments:
            return list(self.segments)
        table = []
        for value, name in (names or {}).items():
            if int(value) != 0:
                table.append(SegmentInfo(name=str(name), label_value=int(value), layer=0))
        return table

    def mask(self, segment: SegmentInfo) -> np.ndarray:
        """Boolean ``(z, y, x)`` mask of one segment."""
        return self.layers[segment.layer] == segment.label_value


# --------------------------------------------------------------------------- helpers

def _nonzero_values(array: np.ndarray) -> Set[int]:
    """Distinct non-zero values of an integer array (a histogram when the values allow, much faster than unique)."""
    if array.size == 0:
        return set()
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high < 10_000_000:
        counts = np.bincount(array.ravel(), minlength=1)
        return {int(v) for v in np.flatnonzero(counts) if v != 0}
    return {int(v) for v in np.unique(array) if v != 0}


def _extension(path: PathLike) -> str:
    name = Path(path).name.lower()
    for suffix in _MULTI_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise InputError("does not exist", path=str(path),
                         fix="check the path (relative paths are taken from the current folder)")


def _itk_message(error: Exception) -> str:
    """The informative line of an ITK exception (they carry file and line noise)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()
    return lines[-1] if lines else type(error).__name__


def _read_with_sitk(path: Path, what: str) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"could not be read as {what}", path=str(path),
                         details=f"reader said: {_itk_message(error)}",
                         fix=f"give a file in a supported format: {READ_FORMATS}") from None


def _as_single_volume(image: sitk.Image, path: Path, what: str) -> sitk.Image:
    """Check the image is one 3D volume (a 4D image with a single volume is accepted)."""
    dimension = image.GetDimension()
    if dimension == 2:
        raise InputError(f"is 2D; ContrastiveSeg needs 3D volumes (this one is {_size_text(image.GetSize())})",
                         path=str(path), fix=f"give the whole 3D {what} (for DICOM, the folder of the series)")
    if dimension == 4:
        volumes = image.GetSize()[3]
        if volumes != 1:
            raise InputError(f"is 4D with {volumes} volumes; ContrastiveSeg needs one 3D volume",
                             path=str(path), fix="extract the volume you want (e.g. in 3D Slicer or with "
                                                 "SimpleITK) and save it as its own file")
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
    elif dimension != 3:
        raise InputError(f"has {dimension} dimensions; ContrastiveSeg needs 3D volumes", path=str(path))
    if min(image.GetSize()) < 2:
        raise InputError(f"has a single slice ({_size_text(image.GetSize())}); ContrastiveSeg needs 3D volumes",
                         path=str(path), fix="if this is one file of a DICOM series, give the folder "
                                             "that holds the whole series")
    return image


def _size_text(size: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in size)


# --------------------------------------------------------------------------- reading

def read_image(path: PathLike, as_float32: bool = True) -> sitk.Image:
    """Read a 3D intensity image (CT) as float32.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or
            MetaImage (``.mha``, ``.mhd``) file, or a folder holding a DICOM
            series (if it holds several, the one with the most files is read,
            with a warning).

        as_float32: cast to float32 (the default).  ``False`` keeps the stored
            pixel type (int16 for most CT): ``predict`` needs the image only
            for its geometry, one resampling and the body threshold, and a
            float32 copy of a 512 x 512 x 300 CT is 300 MiB more at its peak.

    Returns:
        A 3D, single-component ``sitk.Image`` of pixel type float32 (or its
        stored type); ``sitk.GetArrayFromImage`` gives its voxels as ``(z, y, x)``.

    Raises:
        InputError: missing path, unreadable or unknown format, a truncated
        NIfTI file, a DICOM series with a damaged file or uneven slice spacing,
        a 2D image, an image with a single slice, a 4D image with several
        volumes, a multi-component (e.g. RGB) image, or NaN / infinite voxels
        (see :mod:`.integrity`).
    """
    path = Path(path)
    _require_exists(path)
    if path.is_dir():
        image = _read_dicom_series(path)
    else:
        if is_nifti(path):
            check_nifti_file(path, "image")
        image = _read_with_sitk(path, "an image")
    image = _as_single_volume(image, path, "image")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(f"has {components} values per voxel (colour or vector image); "
                         "ContrastiveSeg needs a grey-value volume such as a CT", path=str(path))
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        bad = int(np.count_nonzero(~np.isfinite(sitk.GetArrayViewFromImage(image))))
        if bad:
            total = int(np.prod(image.GetSize()))
            raise InputError(f"has {bad} of {total} voxels that are NaN or infinite", path=str(path),
                             fix="replace them with a valid intensity (e.g. -1024 HU, air, for CT) "
                                 "before using the image, e.g. with numpy.nan_to_num")
    return sitk.Cast(image, sitk.sitkFloat32) if as_float32 else image


def _read_dicom_series(folder: Path) -> sitk.Image:
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series_ids = ()
    if not series_ids:
        raise InputError("is a folder without a DICOM series", path=str(folder),
                         fix=f"give a folder holding the DICOM files of one series, or an image file: {READ_FORMATS}")
    files_by_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(files_by_series[sid]))
    if len(series_ids) > 1:
        counts = ", ".join(f"{sid or '(no id)'}: {len(files_by_series[sid])} files" for sid in series_ids)
        warnings.warn(f"{folder}: holds {len(series_ids)} DICOM series ({counts}); reading the largest, "
                      f"{chosen or '(no id)'}. Put each series in its own folder to choose another.",
                      stacklevel=3)
    unreadable = unreadable_dicom_files(folder, [f for sid in series_ids for f in files_by_series[sid]])
    if unreadable:
        listed = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        raise InputError(f"holds {len(unreadable)} DICOM file(s) that could not be read (truncated or damaged): "
                         f"{listed}", path=str(folder),
                         fix="copy or export the series again; a series with a slice left out would be stacked "
                             "on the wrong grid")
    files = files_by_series[chosen]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetMetaDataDictionaryArrayUpdate(True)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError("holds a DICOM series that could not be read", path=str(folder),
                         details=f"reader said: {_itk_message(error)}",
                         fix="check the series opens in a DICOM viewer (e.g. 3D Slicer's DICOM module)") from None
    if len(files) > 1 and image.GetDimension() == 3:
        positions = []
        for index in range(len(files)):
            text = reader.GetMetaData(index, "0020|0032") if reader.HasMetaDataKey(index, "0020|0032") else ""
            try:
                positions.append([float(v) for v in text.split("\\")])
            except ValueError:
                positions.append([])
        if all(len(p) == 3 for p in positions):
            check_slice_spacing(folder, files, positions, image.GetDirection()[2::3])
    return image


def _is_seg_nrrd(path: Path) -> bool:
    """True for NRRD files whose header carries Slicer segment metadata."""
    if _extension(path) not in (".nrrd", ".nhdr", ".seg.nrrd", ".seg.nhdr"):
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return _extension(path).startswith(".seg")
    return any(key.startswith("Segment") and "_" in key and key[7:key.index("_")].isdigit()
               for key in reader.GetMetaDataKeys())


def labels_to_int32(array: np.ndarray, path: PathLike) -> np.ndarray:
    """A label array as int32, refusing values that are not whole, non-negative numbers.

    Args:
        array: voxel values of a label map, any numeric dtype, any shape.
        path: the file it came from, named in errors.
    """
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise InputError(f"has {int(np.count_nonzero(~finite))} NaN or infinite voxels; label maps "
                             "must hold whole numbers", path=str(path),
                             fix="recreate the label map, or replace those voxels with 0")
        fractional = array != np.round(array)
        if fractional.any():
            example = float(array[fractional].flat[0])
            raise InputError(f"has {int(np.count_nonzero(fractional))} voxels with fractional values "
                             f"(e.g. {example:g}); label maps must hold whole numbers", path=str(path),
                             fix="if it is a probability map, threshold it; if it was resampled, resample "
                                 "it again with nearest-neighbour interpolation")
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        raise InputError(f"has voxels of type {array.dtype}; label maps must hold whole numbers", path=str(path))
    if array.size:
        low, high = array.min(), array.max()
        if low < 0:
            raise InputError(f"has negative label values (lowest {low}); labels must be 0 (background) "
                             "or positive", path=str(path), fix="renumber the labels")
        if high > np.iinfo(np.int32).max:
            raise InputError(f"has label values up to {high}, too large for a label map", path=str(path),
                             fix="renumber the labels")
    return array.astype(np.int32, copy=False)


def read_label_image(path: PathLike) -> LabelImage:
    """Read a label map: NIfTI, NRRD, MetaImage, or a 3D Slicer ``.seg.nrrd``.

    A Slicer segmentation (any NRRD whose header has ``Segment0_ID`` and the
    like) is read with its segment names, colours, values and layers; a plain
    label map gives one layer and no segments.  Float files whose values are
    all whole numbers are accepted.

    Returns:
        A :class:`LabelImage` whose layers are int32 arrays ``(z, y, x)``.

    Raises:
        InputError: missing or unreadable file, a folder, not one 3D volume,
        fractional, negative, NaN or huge values.
    """
    path = Path(path)
    _require_exists(path)
    if path.is_dir():
        raise InputError("is a folder; a label map must be a single file", path=str(path),
                         fix=f"give a label file: {READ_FORMATS.replace(' or a folder holding a DICOM series', '')}"
                             " or a Slicer .seg.nrrd")
    if _is_seg_nrrd(path):
        from .segnrrd import read_seg_nrrd

        return read_seg_nrrd(path)
    if is_nifti(path):
        check_nifti_file(path, "label map")
    image = _as_single_volume(_read_with_sitk(path, "a label map"), path, "label map")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"has {image.GetNumberOfComponentsPerPixel()} values per voxel; a label map has one",
                         path=str(path), fix="save the segmentation as a label map or as a Slicer .seg.nrrd")
    layer = labels_to_int32(sitk.GetArrayFromImage(image), path)
    return LabelImage(image=_int32_image(layer, image), layers=[layer], segments=[], path=str(path))


def _int32_image(array_zyx: np.ndarray, geometry: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx, dtype=np.int32))
    image.SetOrigin(geometry.GetOrigin())
    image.SetSpacing(geometry.GetSpacing())
    image.SetDirection(geometry.GetDirection())
    return image


# --------------------------------------------------------------------------- writing

@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Give a temporary path next to ``path``; on success rename it to ``path``.

    The temporary name keeps the extension of ``path`` (writers pick the
    format from it).  Missing folders are created.  If the body raises, the
    temporary file is removed and ``path`` is untouched.

    Raises:
        InputError: the folder cannot be created or written to.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the folder for {path.name}: {error.strerror or error}",
                         path=str(folder), fix="choose an output folder you can write to") from None
    if not folder.is_dir():
        raise InputError(f"is not a folder, so {path.name} cannot be written in it", path=str(folder),
                         fix="choose an output folder you can write to")
    extension = _extension(path)
    stem = path.name[: len(path.name) - len(extension)] if extension else path.name
    temporary = folder / f".{stem}.{uuid.uuid4().hex[:8]}.tmp{extension}"
    try:
        with open(temporary, "xb"):
            pass
    except OSError as error:
        raise InputError(f"cannot write {path.name} here: {error.strerror or error}", path=str(folder),
                         fix="choose an output folder you can write to, or check its permissions") from None
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _write_extension(path: Path, allowed: Sequence[str]) -> str:
    extension = _extension(path)
    if extension not in allowed:
        raise InputError(f"has an unsupported extension {extension or '(none)'!r}", path=str(path),
                         fix=f"use one of {', '.join(allowed)}")
    return extension


def _check_shape(array: np.ndarray, reference: sitk.Image, what: str) -> None:
    if reference.GetDimension() != 3:
        raise ValueError(f"reference must be a 3D image, got dimension {reference.GetDimension()}")
    expected = tuple(reversed(reference.GetSize()))
    if tuple(array.shape) != expected:
        raise ValueError(f"{what} has shape {tuple(array.shape)} but the reference grid is (z, y, x) = {expected}")


def _sitk_write(image: sitk.Image, temporary: Path, path: Path) -> None:
    try:
        sitk.WriteImage(image, str(temporary), useCompression=True)
    except RuntimeError as error:
        raise InputError("could not be written", path=str(path), details=f"writer said: {_itk_message(error)}",
                         fix="check there is space left on the disk and that the folder is writable") from None


def write_image(path: PathLike, array_zyx: np.ndarray, reference: sitk.Image) -> Path:
    """Write an intensity volume with the geometry of ``reference``, atomically.

    Args:
        path: ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``.
        array_zyx: voxels ``(z, y, x)``, shape ``reversed(reference.GetSize())``; its dtype is kept.
        reference: the image whose spacing, origin and direction are written.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    _write_extension(path, (".nii.gz", ".nii", ".nrrd", ".mha"))
    array_zyx = np.asarray(array_zyx)
    _check_shape(array_zyx, reference, "array_zyx")
    if array_zyx.dtype == np.bool_ or array_zyx.dtype == np.float16:
        array_zyx = array_zyx.astype(np.uint8 if array_zyx.dtype == np.bool_ else np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.CopyInformation(reference)
    with atomic_output(path) as temporary:
        _sitk_write(image, temporary, path)
    return path


def smallest_label_dtype(array: np.ndarray) -> np.dtype:
    """uint8 when the labels fit, else uint16, else int32."""
    high = int(array.max()) if array.size else 0
    if high <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if high <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def write_labelmap(path: PathLike, labels_zyx: np.ndarray, reference: sitk.Image,
                   names: Optional[Dict[int, str]] = None,
                   colors: Optional[Dict[str, Sequence[float]]] = None) -> Path:
    """Write a label map with the geometry of ``reference``, atomically.

    Args:
        path: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, or ``.seg.nrrd`` for a
            3D Slicer segmentation with one named, coloured segment per label
            value present.
        labels_zyx: integer labels ``(z, y, x)``, shape ``reversed(reference.GetSize())``, >= 0.
        reference: the image whose spacing, origin and direction are written.
        names: label value -> name; used by ``.seg.nrrd`` (values without a
            name become ``label_<value>``).  Plain formats cannot store names.
        colors: name -> ``(r, g, b)``, ints 0-255 or floats 0-1; names without
            a colour get :func:`~ContrastiveSegLib.report.colors.colors_for`'s.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    extension = _write_extension(path, _WRITE_EXTENSIONS)
    labels_zyx = np.asarray(labels_zyx)
    _check_shape(labels_zyx, reference, "labels_zyx")
    if not (np.issubdtype(labels_zyx.dtype, np.integer) or labels_zyx.dtype == np.bool_):
        raise ValueError(f"labels_zyx must hold integers, got dtype {labels_zyx.dtype}")
    if labels_zyx.size and labels_zyx.min() < 0:
        raise ValueError("labels_zyx has negative values")
    if extension == ".seg.nrrd":
        from .segnrrd import segments_for_labelmap, write_seg_nrrd

        segments = segments_for_labelmap(labels_zyx, names or {}, colors)
        return write_seg_nrrd(path, labels_zyx, reference, segments)
    array = np.ascontiguousarray(labels_zyx, dtype=smallest_label_dtype(labels_zyx))
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    with atomic_output(path) as temporary:
        _sitk_write(image, temporary, path)
    return path


# --------------------------------------------------------------------------- geometry

def _number(value: float, decimals: int = 4) -> str:
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _vector(values: Sequence[float], decimals: int = 4) -> str:
    return "(" + ", ".join(_number(v, decimals) for v in values) + ")"


def _geometry_rows(image: sitk.Image) -> List[Tuple[str, str]]:
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    axes = " ".join(_vector(direction[:, i], 3) for i in range(3))
    try:
        code = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(image.GetDirection())
        axes += f"  (axes point to {', '.join(code)})"
    except (RuntimeError, AttributeError):
        pass
    return [
        ("size", f"{_size_text(image.GetSize())} voxels"),
        ("spacing", " x ".join(_number(s) for s in image.GetSpacing()) + " mm"),
        ("origin", _vector(image.GetOrigin(), 2) + " mm"),
        ("direction", axes),
    ]


def describe_geometry(image: sitk.Image) -> str:
    """The grid of ``image`` in four lines: size, spacing, origin, direction (x, y, z order; LPS mm)."""
    rows = _geometry_rows(image)
    width = max(len(name) for name, _ in rows) + 1
    return "\n".join(f"{name + ':':<{width + 1}}{value}" for name, value in rows)


def _grid_differences(a: sitk.Image, b: sitk.Image, atol: float) -> Dict[str, bool]:
    return {
        "size": tuple(a.GetSize()) != tuple(b.GetSize()),
        "spacing": not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=atol),
        "origin": not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=atol),
        "direction": not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=atol),
    }


def same_grid(a: sitk.Image, b: sitk.Image, atol: float = 1e-3) -> bool:
    """True when ``a`` and ``b`` have the same size and, within ``atol`` (mm), spacing, origin and direction."""
    if a.GetDimension() != b.GetDimension():
        return False
    return not any(_grid_differences(a, b, atol).values())


def check_same_grid(image: sitk.Image, label: sitk.Image, image_path: PathLike, label_path: PathLike,
                    atol: float = 1e-3) -> None:
    """Raise :class:`InputError` showing both geometries side by side if the grids differ."""
    if same_grid(image, label, atol):
        return
    differs = _grid_differences(image, label, atol) if image.GetDimension() == label.GetDimension() else {}
    left, right = _geometry_rows(image), _geometry_rows(label)
    name_width = max(len(name) for name, _ in left) + 2
    left_width = max(max(len(value) for _, value in left), len("image: " + Path(image_path).name)) + 3
    lines = [f"{'':<{name_width}}{'image: ' + Path(image_path).name:<{left_width}}label: {Path(label_path).name}"]
    for (name, a_value), (_, b_value) in zip(left, right):
        mark = "   <- differs" if differs.get(name, True) else ""
        lines.append(f"{name + ':':<{name_width}}{a_value:<{left_width}}{b_value}{mark}")
    raise InputError(f"is not on the same voxel grid as the image {image_path}", path=str(label_path),
                     details="\n".join(lines), fix=GRID_FIX)


def resample_to_reference(image: sitk.Image, reference: sitk.Image, interpolator: str = "nearest",
                          default_value: float = 0) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference`` through physical (LPS) coordinates.

    Args:
        image: any 3D image (label maps: use ``"nearest"``).
        reference: the grid to resample onto (size, spacing, origin, direction).
        interpolator: ``"nearest"`` (labels) or ``"linear"`` (intensities).
        default_value: value of output voxels that fall outside ``image``.

    Returns:
        An image on the reference grid with the pixel type of ``image``.
    """
    modes = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}
    if interpolator not in modes:
        raise ValueError(f"interpolator must be one of {sorted(modes)}, got {interpolator!r}")
    return sitk.Resample(image, reference, sitk.Transform(), modes[interpolator], float(default_value),
                         image.GetPixelID())


def resample_label_image(labels: LabelImage, reference: sitk.Image) -> LabelImage:
    """All layers of ``labels`` resampled (nearest neighbour) onto the grid of ``reference``."""
    layers = []
    for layer in labels.layers:
        moved = resample_to_reference(_int32_image(layer, labels.image), reference, "nearest", 0)
        layers.append(sitk.GetArrayFromImage(moved).astype(np.int32, copy=False))
    return LabelImage(image=_int32_image(layers[0], reference), layers=layers,
                      segments=list(labels.segments), path=labels.path)
