"""``wsi-apl export geojson|via|cells`` and ``wsi-apl pseudonyms``: the click side of wsi_apl/export.py and
wsi_apl/privacy.py (heavy imports stay inside the commands, so ``wsi-apl --help`` stays quick)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import fail

_RESULTS = click.Path(exists=True, file_okay=False, path_type=Path)
_SLIDE_HELP = ("The slide: its name in triage.csv's slide column (file name or pseudonym), its file name, or the "
               "first digits (at least 6) of its fingerprint.")



@click.group()
def export() -> None:
    """Export a results folder for QuPath (GeoJSON), VGG Image Annotator (VIA 2 project) or as cell tables."""


@export.command("geojson")
@click.argument("results", type=_RESULTS)
@click.option("--slide", default=None, help=_SLIDE_HELP + " Default: every analysed slide.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the <slide>.geojson files.")
def export_geojson_cmd(results: Path, slide: str | None, out: Path) -> None:
    """Cells (detections) and chosen areas (annotations) per slide, in level-0 pixels, for QuPath.

    In QuPath open the slide, then File > Import objects from file (or drag the .geojson onto it)."""
    from ..export import export_geojson

    try:
        files = export_geojson(results, out, slide)
    except (ValueError, OSError) as exc:  # ExportError, PseudonymError: one line naming the file and the fix
        fail(str(exc))
    for f in files:
        click.echo(str(f))
    click.echo(f"{len(files)} slide(s) exported for QuPath to {out}")


@export.command("via")
@click.argument("results", type=_RESULTS)
@click.option("--slide", required=True, help=_SLIDE_HELP)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the area pictures and the VIA project.")
def export_via_cmd(results: Path, slide: str, out: Path) -> None:
    """The chosen areas of a slide as pictures and its detected cells as a VIA 2 project, to correct and
    train with ('wsi-apl train cells --via PROJECT --image-mpp MPP', 'wsi-apl train detector --via PROJECT')."""
    from ..export import export_via

    try:
        project = export_via(results, out, slide)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    click.echo(f"VIA project: {project} (open it in VGG Image Annotator 2 from the folder holding the pictures)")


@export.command("cells")
@click.argument("results", type=_RESULTS)
@click.option("--slide", default=None, help=_SLIDE_HELP + " Default: every analysed slide.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the <slide>.cells.<format> files.")
def export_cells_cmd(results: Path, slide: str | None, fmt: str, out: Path) -> None:
    """The stored cells of each slide as a table (one row per cell: area, boxes, detector score, one
    probability per head, morphometrics), for pandas, R or a spreadsheet. The zarr store stays the store."""
    from ..export import export_cells

    try:
        files = export_cells(results, out, slide, fmt)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    for f in files:
        click.echo(str(f))
    click.echo(f"{len(files)} slide(s) exported as {fmt} to {out}")


@click.command()
@click.argument("results", type=_RESULTS)
@click.argument("slides_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def pseudonyms(results: Path, slides_dir: Path) -> None:
    """Print the file name → pseudonym table of SLIDES_DIR under RESULTS' key (CSV), for the lab's own records.

    The table undoes the pseudonyms: keep it where the lab keeps patient data, never with the outputs."""
    import pandas as pd

    from ..inbox import list_slides
    from ..privacy import PseudonymError, key_path, pseudonym, read_key

    if not key_path(results).exists():
        fail(f"{results}: was not scanned with --pseudonymize (no {key_path(results).name}): its outputs use the "
              "slides' file names")
    try:
        key = read_key(results)
        slides, _ = list_slides(slides_dir)
    except (PseudonymError, FileNotFoundError) as exc:
        fail(str(exc))
    table = pd.DataFrame({"slide": [p.name for p in slides], "pseudonym": [pseudonym(key, p.name) for p in slides]})
    click.echo(table.to_csv(index=False, lineterminator="\n"), nl=False)
    click.echo(f"{len(table)} slide(s); this table links pseudonyms to file names: keep it with the lab's records, "
               "not with the outputs", err=True)
