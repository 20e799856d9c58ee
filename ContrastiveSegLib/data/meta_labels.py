"""Meta labels of pre-training patches, for GCL (docs/gcl.md).

A *meta label* is an attribute of an image known without manual work; two
patches that share its value are positives for it.  Built in:

* ``dataset``: which source dataset the case comes from;
* ``case``: which case (patient) the patch comes from;
* ``position``: the axial position of the patch centre relative to the body's
  extent on the last array axis (the superior-inferior axis after RAS
  preprocessing), cut into ``S`` equal partitions; bin 0 is the most inferior.

Any other name is a per-case attribute: a column of the ``--meta-csv`` file
(one row per case, a ``case`` column plus attribute columns such as contrast
phase or scanner), or else an extra key of the case's entry in its
``dataset.json`` (``"training": [{"image": ..., "label": ..., "phase": "venous"}]``).
A case with no value for an attribute (missing from the CSV, or an empty
cell) gets the id ``MISSING``: for that meta label it is never a positive of
another patch.

Each meta label maps its values to integer ids ``0 .. n-1`` (sorted value
names for attributes, case and dataset indices of :class:`PretrainSources`,
bin numbers for ``position``).
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .sources import PretrainSources

BUILTIN = ("dataset", "case", "position")
MISSING = -1
CASE_COLUMNS = ("case", "case_id", "id")   # accepted names of the CSV column naming the case, any letter case


def position_bin(z: float, z_extent: Tuple[int, int], partitions: int) -> int:
    """Which of ``partitions`` equal slabs of the slices ``z_extent[0] .. z_extent[1]`` holds slice ``z``.

    With ``n = last - first + 1`` slices the bin is ``floor((z - first) * partitions / n)``,
    clipped to ``[0, partitions - 1]`` (a centre outside the body goes to the nearest end slab).
    """
    first, last = int(z_extent[0]), int(z_extent[1])
    slices = max(last - first + 1, 1)
    value = int(np.floor((float(z) - first) * partitions / slices))
    return min(max(value, 0), partitions - 1)


def case_name(case_id: str) -> str:
    """``"<dataset>/<case>"`` -> ``"<case>"``."""
    return case_id.split("/", 1)[1] if "/" in case_id else case_id


@dataclass
class MetaCSV:
    """A meta-label CSV read into ``{row key: {column: value}}`` (empty cells left out)."""

    path: str
    case_column: str
    columns: List[str]                       # the attribute columns, in file order
    rows: Dict[str, Dict[str, str]] = field(default_factory=dict)


def read_meta_csv(path: str) -> MetaCSV:
    """Read a meta-label CSV; clear errors for a missing file, no case column or repeated cases."""
    if not os.path.isfile(path):
        raise InputError("does not exist" if not os.path.exists(path) else "is not a file", path=path,
                         fix="give --meta-csv a CSV file with a 'case' column and one column per attribute")
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as handle:
            sample = handle.read(4096)
            handle.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            reader = csv.DictReader(handle, dialect=dialect)
            header = [name.strip() for name in (reader.fieldnames or [])]
            records = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()}
                       for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot be read as a CSV file ({error})", path=path,
                         fix="save it as UTF-8 text with comma-separated columns") from None
    if not header:
        raise InputError("is empty (no header line)", path=path,
                         fix="write a header line such as: case,phase,scanner")
    lowered = {name.lower(): name for name in header}
    case_column = next((lowered[name] for name in CASE_COLUMNS if name in lowered), None)
    if case_column is None:
        raise InputError("has no column naming the case", path=path,
                         details=f"columns found: {', '.join(header)}",
                         fix=f"name the column that holds the case ids '{CASE_COLUMNS[0]}' (values: "
                             "'<dataset>/<case>' or the bare case name, as in the image file names)")
    columns = [name for name in header if name != case_column and name]
    if not columns:
        raise InputError(f"has only the case column {case_column!r}", path=path,
                         fix="add one column per attribute, e.g. case,phase,scanner")
    rows: Dict[str, Dict[str, str]] = {}
    for number, record in enumerate(records, start=2):
        key = record.get(case_column, "")
        if not key:
            continue
        if key in rows:
            raise InputError(f"case {key!r} is listed twice (line {number})", path=path,
                             fix="keep one row per case")
        rows[key] = {name: record.get(name, "") for name in columns if record.get(name, "")}
    return MetaCSV(path, case_column, columns, rows)


class MetaLabels:
    """Integer ids of the chosen meta labels for every case (and, for ``position``, every patch centre).

    Args:
        sources: the pre-training cases.
        names: the meta labels, in order (each a built-in name or an attribute name).
        partitions: ``S`` of ``position``.
        csv_path: optional meta-label CSV.
    """

    def __init__(self, sources: PretrainSources, names: Sequence[str], partitions: int = 4,
                 csv_path: Optional[str] = None):
        names = [str(n).strip() for n in names]
        if not names:
            raise InputError("no meta label chosen", path="--meta-labels",
                             fix=f"name at least one, e.g. --meta-labels {','.join(BUILTIN)}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InputError(f"meta label(s) named twice: {', '.join(repeated)}", path="--meta-labels",
                             fix="name each meta label once")
        if int(partitions) < 1:
            raise InputError(f"positions must be at least 1, got {partitions}", path="--set positions")
        self.sources = sources
        self.names = names
        self.partitions = int(partitions)
        self.table = read_meta_csv(csv_path) if csv_path else None
        case_attributes = self._case_attributes()
        known = {key for attributes in case_attributes for key in attributes}
        if self.table:
            known.update(self.table.columns)
        unknown = [n for n in names if n not in BUILTIN and n not in known]
        if unknown:
            choices = list(BUILTIN) + sorted(known)
            where = f"the columns of {self.table.path}" if self.table else "--meta-csv columns (none given)"
            raise InputError(f"unknown meta label name(s): {', '.join(unknown)}", path="--meta-labels",
                             details=f"available: {', '.join(choices)} (built in, {where}, "
                                     "and extra keys of the dataset.json case entries)",
                             fix="choose names from the list above, or give a --meta-csv with those columns")
        # values[k][case_index] = id (MISSING when the case has no value); position is filled per patch.
        self.values: List[np.ndarray] = []
        self.vocabularies: List[List[str]] = []
        for name in names:
            if name == "dataset":
                ids = np.array([case.dataset_index for case in sources.cases], dtype=np.int64)
                vocabulary = list(sources.dataset_names)
            elif name == "case":
                ids = np.arange(len(sources.cases), dtype=np.int64)
                vocabulary = [case.prepared.case_id for case in sources.cases]
            elif name == "position":
                ids = np.full(len(sources.cases), MISSING, dtype=np.int64)
                vocabulary = [f"{b + 1}/{self.partitions}" for b in range(self.partitions)]
            else:
                raw = [attributes.get(name, "") for attributes in case_attributes]
                vocabulary = sorted({value for value in raw if value})
                lookup = {value: index for index, value in enumerate(vocabulary)}
                ids = np.array([lookup.get(value, MISSING) for value in raw], dtype=np.int64)
                if not vocabulary:
                    raise InputError(f"meta label {name!r} has no value for any case", path=self._where(name),
                                     fix="fill in the column for the pre-training cases, or leave it out of "
                                         "--meta-labels")
            self.values.append(ids)
            self.vocabularies.append(vocabulary)

    def _where(self, name: str) -> str:
        return self.table.path if self.table and name in self.table.columns else "--meta-labels"

    def _case_attributes(self) -> List[Dict[str, str]]:
        """Per case: the dataset.json attributes, overridden by the CSV row of that case."""
        result = [{k: str(v).strip() for k, v in case.attributes.items() if str(v).strip()}
                  for case in self.sources.cases]
        if not self.table:
            return result
        table = self.table
        full_ids = [case.prepared.case_id for case in self.sources.cases]
        full_index = {case_id: index for index, case_id in enumerate(full_ids)}
        by_bare: Dict[str, List[int]] = {}
        for index, case_id in enumerate(full_ids):
            by_bare.setdefault(case_name(case_id), []).append(index)
        matched = set()
        for key, row in table.rows.items():
            if key in full_index:
                targets = [full_index[key]]
            else:
                targets = by_bare.get(key, [])
                if len(targets) > 1:
                    raise InputError(f"case {key!r} is ambiguous: it names "
                                     f"{', '.join(full_ids[i] for i in targets)}", path=table.path,
                                     fix=f"write the full id '<dataset>/<case>' in the {table.case_column!r} column")
            for index in targets:
                # A row given by its full id wins over one given by the bare name.
                if index in matched and key not in full_index:
                    continue
                result[index].update(row)
                matched.add(index)
        missing = [full_ids[i] for i in range(len(full_ids)) if i not in matched]
        used_columns = [n for n in self.names if n in table.columns]
        if missing and used_columns:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            warnings.warn(f"{table.path}: {len(missing)} of {len(full_ids)} pre-training case(s) have no row "
                          f"({shown}); they get no value for {', '.join(used_columns)} and are never a positive "
                          f"for it. What to do: add rows named '<dataset>/<case>' or '<case>' if that is not "
                          f"intended.", stacklevel=2)
        unmatched = [key for key in table.rows if key not in full_index and key not in by_bare]
        if unmatched:
            shown = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
            warnings.warn(f"{table.path}: {len(unmatched)} row(s) name no pre-training case ({shown}); "
                          f"ignored. Case ids look like {full_ids[0] if full_ids else '<dataset>/<case>'}.",
                          stacklevel=2)
        return result

    def ids(self, case_index: int, centre_z: float) -> np.ndarray:
        """``[K]`` int64 meta-label ids of a patch of case ``case_index`` centred on slice ``centre_z``."""
        out = np.empty(len(self.names), dtype=np.int64)
        case = self.sources.cases[case_index]
        for k, name in enumerate(self.names):
            if name == "position":
                out[k] = position_bin(centre_z, case.z_extent, self.partitions)
            else:
                out[k] = self.values[k][case_index]
        return out

    def describe(self) -> str:
        """One line per meta label: how many values and how many cases have none."""
        lines = []
        for name, ids, vocabulary in zip(self.names, self.values, self.vocabularies):
            text = f"{name}: {len(vocabulary)} value(s)"
            if name not in ("position",):
                missing = int((ids == MISSING).sum())
                if missing:
                    text += f", {missing} case(s) without a value"
            lines.append(text)
        return "; ".join(lines)
