"""Synthetic cohorts, slide facts and area selection: ``synth``, ``estimate-mpp``, ``info``, ``select``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .common import echo_err, fail, parse_area

# -- synth ---------------------------------------------------------------------------------------


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--slides", "n_slides", type=int, default=None, help="Number of slides (diagnoses cycle apl, aml, healthy, reactive).")
@click.option("--diagnoses", default=None, help="Counts per diagnosis, e.g. apl:5,aml:5,healthy:5,reactive:5.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mpp", type=float, default=0.125, show_default=True, help="µm per pixel of level 0 (0.125: 100x oil).")
@click.option("--size", default="20000x15000", show_default=True, help="Slide size WIDTHxHEIGHT in level-0 pixels.")
@click.option("--stain", default=None, help="Stain preset for every slide (mgg, wright, giemsa, leishman, pale, dark); default: drawn per slide, leishman held out.")
@click.option("--plain", is_flag=True, help="Write single 2560x1920 camera-frame pictures (PNG) instead of pyramidal slides.")
@click.option("--slides-per-patient", type=int, default=1, show_default=True)
@click.option("--defect", type=click.Choice(["none", "blurred", "no_monolayer", "empty"]), default="none", show_default=True,
              help="Make slides that cannot be analysed (for QC tests).")
@click.option("--jpeg-quality", type=click.IntRange(10, 100), default=None,
              help="JPEG quality of the tiles (default: drawn per slide, 78-92).")
@click.option("--smear", "smear_shape", type=click.Choice(["normal", "narrow"]), default="normal", show_default=True,
              help="narrow: the monolayer is only a 250-450 µm band across the smear (selector tests).")
@click.option("--layout", type=click.Choice(["wsi-apl", "paper"]), default="wsi-apl", show_default=True,
              help="paper: also write the paper's wsi.csv and labeled_cells.csv (with --plain camera frames).")
def synth(out_dir: Path, n_slides, diagnoses, seed, mpp, size, stain, plain, slides_per_patient, defect,
          jpeg_quality, smear_shape, layout) -> None:
    """Write a synthetic bone-marrow-smear cohort with ground truth and labels.csv."""
    from ..synth.cohort import DIAGNOSES, parse_diagnoses, synth_cohort

    if layout == "paper" and not plain:
        raise click.UsageError("--layout paper holds camera frames: add --plain")
    if diagnoses:
        dx = parse_diagnoses(diagnoses)
    else:
        n = 4 if n_slides is None else n_slides
        dx = [DIAGNOSES[i % len(DIAGNOSES)] for i in range(n)]
    w, h = parse_area(size)
    t0 = time.time()
    recs = synth_cohort(out_dir, dx, seed=seed, mpp=mpp, size=(w, h), stain=stain, plain=plain,
                        slides_per_patient=slides_per_patient, defect=defect, jpeg_quality=jpeg_quality,
                        smear=smear_shape, log=click.echo)
    click.echo(f"{len(recs)} slides in {out_dir} ({time.time() - t0:.1f} s); labels: {out_dir / 'labels.csv'}")
    if layout == "paper":
        from ..paper_layout import write_paper_layout

        frames, cells = write_paper_layout(out_dir)
        click.echo(f"the paper's layout: {frames}, {cells}")


@click.command("estimate-mpp")
@click.argument("pictures", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--red-cell-um", type=float, default=7.5, show_default=True, help="Diameter of a red cell in the smear.")
@click.option("--max-pictures", type=click.IntRange(min=1), default=400, show_default=True,
              help="Pictures looked at per folder (spread evenly).")
@click.option("--json", "as_json", is_flag=True)
def estimate_mpp_cmd(pictures, red_cell_um, max_pictures, as_json) -> None:
    """Estimate the pixel size of pictures (or folders of them) that state none, from their red cells.

    Fits a circle to the visible outline of every red cell (about 7.5 µm across in a dried smear) and
    prints the most common diameter in pixels and the µm per pixel it implies. Prefer a stage micrometer."""
    import numpy as np
    from PIL import Image

    from tile_selector.red_cells import estimate_mpp

    from ..train.picture_sets import PICTURE_SUFFIXES

    files: list[Path] = []
    for p in pictures:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in PICTURE_SUFFIXES)
            files += found[::max(1, len(found) // max_pictures)][:max_pictures]
        else:
            files.append(p)

    def images():
        for f in files:
            try:
                with Image.open(f) as im:
                    yield np.asarray(im.convert("RGB"))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                echo_err(f"{f}: skipped, cannot read it ({exc})")

    try:
        est = estimate_mpp(images(), red_cell_um)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(est.to_json(), indent=2))
        return
    q1, q3 = est.quartiles_px
    click.echo(f"{est.red_cells} red cells measured on {est.pictures} of {est.pictures_read} pictures: most common "
               f"diameter {est.mode_px:.1f} px (median {est.median_px:.1f}, quartiles {q1:.1f}-{q3:.1f}); at "
               f"{est.red_cell_um:g} µm per red cell: {est.mpp:.4f} µm/px")


# -- info / select -----------------------------------------------------------------------------


@click.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=None, help="µm per pixel for a file without a resolution.")
@click.option("--reader", type=click.Choice(["auto", "openslide", "tiffslide", "pil"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (reader, vendor, mpp, levels, ...).")
def info(slide: Path, mpp, reader, as_json) -> None:
    """Format, vendor, levels, dimensions and resolution of a slide."""
    from tile_selector.errors import SlideError
    from tile_selector.slide import open_slide

    try:
        s = open_slide(slide, reader=reader, mpp=mpp)
    except SlideError as exc:
        fail(str(exc))
    d = s.info()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"{slide}")
    click.echo(f"  reader  {d['reader']}   vendor {d['vendor']}")
    click.echo(f"  mpp     {d['mpp'][0]:.4f} x {d['mpp'][1]:.4f} µm/px ({d['mpp_source']})")
    if d["objective_power"]:
        click.echo(f"  objective {d['objective_power']:g}x")
    for i, lv in enumerate(d["levels"]):
        click.echo(f"  level {i}: {lv['width']} x {lv['height']} px, downsample {lv['downsample']:.3f}")
    if d["associated_images"]:
        click.echo(f"  associated images (never exported): {', '.join(d['associated_images'])}")


@click.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--mpp", type=float, default=None, help="µm per pixel for a file without a resolution.")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None, help="Take area size and mpp from a bundle.")
@click.option("--area", default="2560x1920", show_default=True, help="Area size in pixels at --area-mpp.")
@click.option("--area-mpp", type=float, default=None, help="Working resolution of the areas (default: the slide's).")
@click.option("--max-areas", type=int, default=12, show_default=True)
@click.option("--target-cells", type=int, default=500, show_default=True, help="Stop when this many nucleated cells are expected (0: no early stop).")
@click.option("--reader", type=click.Choice(["auto", "openslide", "tiffslide", "pil"]), default="auto")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write overview.png, the area images and selection.json here.")
@click.option("--json", "as_json", is_flag=True)
def select(slide, mpp, bundle_dir, area, area_mpp, max_areas, target_cells, reader, out_dir, as_json) -> None:
    """Choose representative, in-focus monolayer areas of a slide."""
    from tile_selector.errors import SlideError
    from tile_selector.select import SelectorConfig, select_areas
    from tile_selector.slide import open_slide

    size = parse_area(area)
    if bundle_dir is not None:
        from workers.bundle import load_bundle

        b = load_bundle(bundle_dir, verify=False)
        size, area_mpp = b.area_size, b.mpp
    try:
        s = open_slide(slide, reader=reader, mpp=mpp)
        sel = select_areas(s, size, area_mpp, SelectorConfig(max_areas=max_areas, target_cells=target_cells))
    except SlideError as exc:
        fail(str(exc))
    d = sel.to_json()
    d["slide"] = str(slide)
    if out_dir is not None:
        from tile_selector.overview import overview_image

        out_dir.mkdir(parents=True, exist_ok=True)
        if sel.overview is not None:
            overview_image(sel, s.dimensions).save(out_dir / "overview.png")
        from PIL import Image

        for a in sel.areas:
            Image.fromarray(s.read_area(a.box, a.size).image).save(out_dir / f"area_{a.index + 1:02d}.png")
        (out_dir / "selection.json").write_text(json.dumps(d, indent=2))
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"{slide}: {sel.status}" + (f" — {sel.reason}" if sel.reason else ""))
    for a in sel.areas:
        click.echo(f"  area {a.index + 1}: box {a.box}, ~{a.scores['cells']} cells, focus {a.scores['focus']:.2f}")
    if sel.rejected:
        click.echo("  rejected candidates: " + ", ".join(f"{v} {k}" for k, v in sel.rejected.items()))
    for w in sel.warnings:
        click.echo(f"  QC: {w}")
