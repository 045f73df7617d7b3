"""Labelled cells from several sources in one run, each at its own pixel size.

A lab may train (or evaluate) the heads on a synthetic cohort (``--truth``), a cells CSV or a VIA
project of its own pictures (``--cells`` / ``--via``), the paper's published layout (``--paper``) and
any number of class-folder sets (``--folders DIR[:MPP]``), together. Every source is read at the
heads' own pixel size and split on its own (by patient where it has patients, else by picture), so
each source has cells on both sides; the training and validation cells are then joined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workers.classifier import CellConfig

from .cell_labels import read_labelled_cells
from .cells import CellSet, split_cells
from .picture_sets import FolderSource, PictureReport, read_folder_sets

BY_PICTURE = ("no patient ids: the split is by picture, so cells of one patient may sit on both sides and "
              "these figures can be optimistic")
#: The same caveat where nothing is split (evaluation).
BY_PICTURE_CI = ("no patient ids: the confidence intervals resample pictures, not patients, and may be too "
                 "narrow; cells of the training patients may be among these")


@dataclass
class CellSources:
    """Where labelled cells come from; any combination."""

    cohort: Path | None = None
    cells_csv: Path | None = None
    via: Path | None = None
    images: Path | None = None
    paper: Path | None = None
    folders: list[FolderSource] = field(default_factory=list)
    image_mpp: float | None = None   # --cells/--via/--paper pictures' pixel size

    def any(self) -> bool:
        return any(x is not None for x in (self.cohort, self.cells_csv, self.via, self.paper)) or bool(self.folders)

    def describe(self) -> str:
        parts = [f"truth {self.cohort}" if self.cohort else "", f"cells {self.cells_csv}" if self.cells_csv else "",
                 f"via {self.via}" if self.via else "", f"paper {self.paper}" if self.paper else ""]
        parts += [f"folders {f.path} ({f.mpp:g} µm/px)" for f in self.folders]
        return "; ".join(p for p in parts if p)


def _named(cells: CellSet, name: str) -> CellSet:
    cells.sources = np.full(len(cells), name, dtype=object)
    cells.patients = np.asarray([f"{name}:{p}" for p in cells.patients], dtype=object)
    return cells


def _join(sets: list[CellSet]) -> CellSet:
    out = sets[0]
    for s in sets[1:]:
        out = CellSet.join(out, s)
    return out


def picture_cells(src: CellSources, heads: tuple[str, ...], cell_mpp: float | None, crop_um: float,
                  log: Callable[[str], None], csv_mpp: float | None = None
                  ) -> tuple[list[CellSet], list[str], PictureReport | None]:
    """The labelled cells of every picture source (all but ``--truth``), each named, at ``cell_mpp``
    (None: the pictures' own pixels); notes for the user (the by-picture caveat) and the folder sets'
    reading report. ``csv_mpp``: the pixel size of ``--cells``/``--via`` pictures when
    ``src.image_mpp`` is not given."""
    from ..paper_layout import paper_cells

    sets, notes, report = [], [], None
    if src.cells_csv is not None or src.via is not None:
        for path, via in ((src.cells_csv, None), (None, src.via)):
            if path is None and via is None:
                continue
            cs = read_labelled_cells(path, via, src.images, heads, src.image_mpp or csv_mpp, cell_mpp, log=log)
            sets.append(_named(cs, Path(path or via).name))
    if src.paper is not None:
        cs = paper_cells(src.paper, heads, src.image_mpp, cell_mpp)
        log(f"  {src.paper}: {len(cs)} labelled cells in {len(cs.images)} frames, {len(set(cs.patients))} patients")
        sets.append(_named(cs, Path(src.paper).name))
    if src.folders:
        cs, report = read_folder_sets(src.folders, heads, cell_mpp, crop_um, log=log)
        for line in report.lines():
            log("  " + line)
        if len(cs) == 0:
            raise ValueError("no readable picture in " + ", ".join(str(f.path) for f in src.folders))
        cs.patients = np.asarray(cs.patients, dtype=object)
        sets.append(cs)
        notes.append(BY_PICTURE)
    return sets, notes, report


def training_cells(src: CellSources, geometry, cfg: CellConfig, *, seed: int = 0,
                   log: Callable[[str], None] = print) -> tuple[CellSet, CellSet, bool, list[str]]:
    """(training, validation, synthetic, notes): every source read at the heads' pixel size, split on
    its own (patients, else pictures), then joined."""
    from .data import read_cohort
    from .splits import split_by_patient
    from .steps import _synthetic, cell_size, collect_samples

    cell_mpp = cfg.cell_mpp(geometry.mpp) if geometry.mpp else None
    trains, vals, notes, synthetic = [], [], [], False
    if src.cohort is not None:
        entries = read_cohort(src.cohort)
        synthetic = _synthetic(entries)
        slide_mpp = entries[0].truth().get("mpp") if entries and entries[0].truth_path else None
        if slide_mpp and cell_mpp and slide_mpp > cell_mpp * 1.05:
            log(f"  warning: {src.cohort}'s slides are at {slide_mpp:g} µm/px, coarser than the {cell_mpp:g} µm/px "
                "the crops are cut from: they are enlarged (give --crop-um/--crop-px for coarser crops)")
        tr, va = split_by_patient(entries, (0.8, 0.2), seed=seed)
        fine = cell_size(geometry, cfg)
        train_s = sum(collect_samples(tr, geometry, log, seed=seed, cells=fine), [])
        val_s = sum(collect_samples(va, geometry, log, n_random=0, seed=seed, cells=fine), [])
        name = Path(src.cohort).name
        if not train_s:
            log(f"  warning: {src.cohort}: no area of its training slides could be read (no usable monolayer "
                "area on any of them): it adds no cells")
        trains.append(_named(CellSet.from_samples(train_s, cfg.heads, geometry.mpp), name))
        vals.append(_named(CellSet.from_samples(val_s, cfg.heads, geometry.mpp), name))
    if src.folders and cell_mpp is None:
        raise ValueError("--folders: the bundle needs a pixel size (--mpp) to read the pictures at a physical size")
    sets, more, _ = picture_cells(src, cfg.heads, cell_mpp, cfg.crop_um, log, csv_mpp=geometry.mpp)
    notes += more
    for cs in sets:
        tr, va = split_cells(cs, seed, source=cs.source_names()[0] if len(cs) else "the cells")
        trains.append(tr)
        vals.append(va)
    if not trains:
        raise ValueError("no labelled cells: give --truth, --cells, --via, --paper or --folders")
    tr, va = _join(trains), _join(vals)
    for name in dict.fromkeys(tr.source_names()):
        m_tr, m_va = tr.source_names() == name, va.source_names() == name
        log(f"  {name or 'cells'}: {int(m_tr.sum())} training, {int(m_va.sum())} validation cells; positives "
            + ", ".join(f"{h} {int(np.nansum(tr.labels[m_tr, j]))}" for j, h in enumerate(cfg.heads)))
    for n in notes:
        log(f"  note: {n}")
    return tr, va, synthetic, notes
