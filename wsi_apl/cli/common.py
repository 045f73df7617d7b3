"""What several command groups share: error output, WIDTHxHEIGHT and class-list options, and the
labelled-data sources of training and evaluation."""

from __future__ import annotations

import sys
from typing import NoReturn

import click


def echo_err(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)


def fail(msg: str) -> NoReturn:
    """One error line on stderr, then exit status 2 (bad input, nothing done)."""
    echo_err(msg)
    sys.exit(2)


def parse_area(value: str) -> tuple[int, int]:
    try:
        w, h = value.lower().split("x")
        return int(w), int(h)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: expected WIDTHxHEIGHT, e.g. 2560x1920") from exc


def geometry(mpp: float, area: str):
    from ..train.steps import Geometry

    return Geometry(mpp=mpp, area=parse_area(area))


def parse_classes(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def one_source(via, voc, cohort, paper=None) -> None:
    if sum(x is not None for x in (via, voc, cohort, paper)) != 1:
        raise click.UsageError("give exactly one of --via ANNOT.json, --voc XML_DIR, --truth COHORT_DIR, --paper DIR")


FOLDERS_HELP = ("A class-folder set of single-cell pictures (one subfolder per class, or file-name prefixes where a "
                 "folder mixes classes), DIR or DIR:MPP (the pictures' µm per pixel; default --image-mpp). Repeat "
                 "for several sets.")


def cell_sources(cohort, cells_csv, via, images, paper, folders, class_map, image_mpp):
    from ..train.picture_sets import FolderSource
    from ..train.sources import CellSources

    if cells_csv is not None and via is not None:
        raise click.UsageError("give one of --cells CELLS.csv or --via PROJECT.json (not both)")
    try:
        fs = [FolderSource.parse(f, image_mpp, class_map) for f in folders]
    except (ValueError, FileNotFoundError) as exc:
        raise click.BadParameter(str(exc), param_hint="--folders") from None
    if class_map is not None and not fs:
        raise click.UsageError("--class-map maps the classes of --folders sets; give --folders DIR")
    src = CellSources(cohort=cohort, cells_csv=cells_csv, via=via, images=images, paper=paper, folders=fs,
                      image_mpp=image_mpp)
    if not src.any():
        raise click.UsageError("give labelled cells: --truth COHORT, --cells CELLS.csv, --via PROJECT.json, "
                               "--paper DIR and/or --folders DIR[:MPP] (several may be combined)")
    return src
