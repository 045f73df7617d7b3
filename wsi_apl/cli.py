"""The ``wsi-apl`` command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from . import __version__
from .pipeline import DECISION_SUPPORT
from .status import Status
from .train.cells import TRAIN_CELLS_DEFAULTS as _CELLS


def _echo_err(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)


def _area(value: str) -> tuple[int, int]:
    try:
        w, h = value.lower().split("x")
        return int(w), int(h)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: expected WIDTHxHEIGHT, e.g. 2560x1920") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-apl")
def main() -> None:
    """Whole-slide batch scanner flagging suspected acute promyelocytic leukemia (APL) in bone-marrow smears.

    Decision support only: an expert must review every slide; not_flagged does not exclude APL.
    """


# -- synth ---------------------------------------------------------------------------------------


@main.command()
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
    from .synth.cohort import DIAGNOSES, parse_diagnoses, synth_cohort

    if layout == "paper" and not plain:
        raise click.UsageError("--layout paper holds camera frames: add --plain")
    if diagnoses:
        dx = parse_diagnoses(diagnoses)
    else:
        n = 4 if n_slides is None else n_slides
        dx = [DIAGNOSES[i % len(DIAGNOSES)] for i in range(n)]
    w, h = _area(size)
    t0 = time.time()
    recs = synth_cohort(out_dir, dx, seed=seed, mpp=mpp, size=(w, h), stain=stain, plain=plain,
                        slides_per_patient=slides_per_patient, defect=defect, jpeg_quality=jpeg_quality,
                        smear=smear_shape, log=click.echo)
    click.echo(f"{len(recs)} slides in {out_dir} ({time.time() - t0:.1f} s); labels: {out_dir / 'labels.csv'}")
    if layout == "paper":
        from .paper_layout import write_paper_layout

        frames, cells = write_paper_layout(out_dir)
        click.echo(f"the paper's layout: {frames}, {cells}")


@main.command("estimate-mpp")
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

    from .train.picture_sets import PICTURE_SUFFIXES

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
                _echo_err(f"{f}: skipped, cannot read it ({exc})")

    try:
        est = estimate_mpp(images(), red_cell_um)
    except ValueError as exc:
        _echo_err(str(exc))
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(est.to_json(), indent=2))
        return
    q1, q3 = est.quartiles_px
    click.echo(f"{est.red_cells} red cells measured on {est.pictures} of {est.pictures_read} pictures: most common "
               f"diameter {est.mode_px:.1f} px (median {est.median_px:.1f}, quartiles {q1:.1f}-{q3:.1f}); at "
               f"{est.red_cell_um:g} µm per red cell: {est.mpp:.4f} µm/px")


# -- info / select -----------------------------------------------------------------------------


@main.command()
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
        _echo_err(str(exc))
        sys.exit(2)
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


@main.command()
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

    size = _area(area)
    if bundle_dir is not None:
        from workers.bundle import load_bundle

        b = load_bundle(bundle_dir, verify=False)
        size, area_mpp = b.area_size, b.mpp
    try:
        s = open_slide(slide, reader=reader, mpp=mpp)
        sel = select_areas(s, size, area_mpp, SelectorConfig(max_areas=max_areas, target_cells=target_cells))
    except SlideError as exc:
        _echo_err(str(exc))
        sys.exit(2)
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


# -- train ---------------------------------------------------------------------------------------


@main.group()
def train() -> None:
    """Train the models of a bundle (each step adds or replaces its part)."""


def _geometry(mpp: float, area: str):
    from .train.steps import Geometry

    return Geometry(mpp=mpp, area=_area(area))


def _classes(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _one_source(via, voc, cohort, paper=None) -> None:
    if sum(x is not None for x in (via, voc, cohort, paper)) != 1:
        raise click.UsageError("give exactly one of --via ANNOT.json, --voc XML_DIR, --truth COHORT_DIR, --paper DIR")


@train.command("detector")
@click.option("--via", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="VGG Image Annotator project (VIA 2 or 3 JSON): rect, circle, ellipse and polygon regions.")
@click.option("--voc", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A folder of Pascal VOC XML files (e.g. BCCD's Annotations).")
@click.option("--truth", "cohort", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A cohort folder with labels.csv and truth/ (e.g. from 'wsi-apl synth').")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder holding the annotated pictures (--via / --voc).")
@click.option("--paper", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The paper's published layout: wsi.csv, labeled_cells.csv (its Cell objects) and the frames "
                   "(0.0668 µm/px unless --mpp).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle directory.")
@click.option("--classes", default=None, help="Keep only boxes with these labels (comma-separated), as one class 'cell'.")
@click.option("--mpp", type=float, default=None,
              help="Pictures: their pixel size in µm (default: unknown, used at their own pixels). "
                   "--truth: the bundle's working resolution (default 0.5).")
@click.option("--area", default="640x480", show_default=True, help="--truth: area size in pixels at --mpp.")
@click.option("--backbone", type=click.Choice(["mobilenet_v3", "resnet50_fpn_v2"]), default="mobilenet_v3", show_default=True)
@click.option("--epochs", type=int, default=60, show_default=True)
@click.option("--budget", type=float, default=None,
              help="Upper bound on the training time in seconds (all trials together); a warning when reached.")
@click.option("--trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="Optuna search over learning rate, momentum, weight decay and schedule with N trials.")
@click.option("--init", "init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Continue from the detector of this bundle (human-in-the-loop rounds, fine-tuning).")
@click.option("--backbone-weights", default=None,
              help="ImageNet/COCO weights on disk (.pth/.safetensors), or 'hub' for the torch hub cache. "
                   "Nothing is downloaded; without it the backbone starts from scratch.")
@click.option("--test-fraction", type=click.FloatRange(0.0, 0.5), default=0.15, show_default=True,
              help="Share of patients (pictures without one: of pictures) held out as the test set.")
@click.option("--seed", type=int, default=0)
def train_detector_cmd(via, voc, cohort, images, paper, out, classes, mpp, area, backbone, epochs, budget, trials,
                       init, backbone_weights, test_fraction, seed) -> None:
    """Train the Faster R-CNN cell detector from boxes (VIA, VOC or synthetic ground truth).

    Patient-grouped train / validation / test split, early stopping on validation AP@0.5, the best
    checkpoint kept, test metrics stored in the bundle.
    """
    from workers.bundle import BundleError, load_bundle

    from .train.data import read_cohort
    from .train.splits import split_by_patient
    from .train.steps import (
        _synthetic,
        collect_samples,
        open_or_create,
        picture_geometry,
        picture_samples,
        step_detector,
    )

    _one_source(via, voc, cohort, paper)
    val_f = 0.15
    try:
        init_b = load_bundle(init) if init else None
        weights = None
        if backbone_weights == "hub":
            from .train.detector import find_hub_weights

            weights = find_hub_weights(backbone)
            click.echo(f"  torch hub cache: {weights or 'no weights for ' + backbone + ' (starting from scratch)'}")
        elif backbone_weights:
            weights = Path(backbone_weights)
            if not weights.is_file():
                raise click.BadParameter(f"{weights}: no such file", param_hint="--backbone-weights")
        if cohort is not None:
            geo = _geometry(mpp or 0.5, area)
            entries = read_cohort(cohort)
            tr, va, te = split_by_patient(entries, (1.0 - val_f - test_fraction, val_f, test_fraction), seed=seed)
            bundle = open_or_create(out, geo, _synthetic(entries))
            train_s = sum(collect_samples(tr, geo, click.echo, seed=seed), [])
            val_s = sum(collect_samples(va, geo, click.echo, n_random=0, seed=seed), [])
            test_s = sum(collect_samples(te, geo, click.echo, n_random=0, seed=seed), [])
            source = f"truth {cohort}"
        else:
            if paper is not None:
                from .paper_layout import PAPER_MPP

                mpp = mpp or PAPER_MPP
            work = mpp
            if init_b is not None and init_b.mpp_known:
                if mpp is None:
                    raise click.UsageError(f"{init}: works at {init_b.mpp} µm/px; give the pictures' pixel size "
                                           "with --mpp so that they can be resampled to it")
                work = init_b.mpp
            if paper is not None:
                from .paper_layout import paper_annotations
                from .train.data import image_samples

                samples = image_samples(paper_annotations(paper), mpp, work)
                click.echo(f"  {len(samples)} frames, {sum(len(s.boxes) for s in samples)} cells ({paper})")
            else:
                samples = picture_samples(via, voc, images, _classes(classes), mpp, work, click.echo)
            # by patient (a picture without one is its own group), not stratified: pictures carry no diagnosis
            tr, va, te = split_by_patient(samples, (1.0 - val_f - test_fraction, val_f, test_fraction), seed=seed,
                                          stratify=lambda s: "")
            train_s, val_s, test_s = tr, va, te
            bundle = open_or_create(out, picture_geometry(samples, work), synthetic=False)
            source = (f"paper {paper}" if paper else f"{'via' if via else 'voc'} {via or voc}") + (
                f" classes {classes}" if classes else "")
        step_detector(bundle, train_s, val_s, backbone=backbone, epochs=epochs, budget_s=budget, seed=seed,
                      init=init_b, backbone_weights=weights, trials=trials, test_s=test_s, source=source,
                      log=click.echo)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        _echo_err(str(exc))
        sys.exit(2)


_FOLDERS_HELP = ("A class-folder set of single-cell pictures (one subfolder per class, or file-name prefixes where a "
                 "folder mixes classes), DIR or DIR:MPP (the pictures' µm per pixel; default --image-mpp). Repeat "
                 "for several sets.")


def _cell_sources(cohort, cells_csv, via, images, paper, folders, class_map, image_mpp):
    from .train.picture_sets import FolderSource
    from .train.sources import CellSources

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


@train.command("cells")
@click.option("--truth", "cohort", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A synthetic cohort (labels.csv + truth/): every true cell is a labelled cell.")
@click.option("--cells", "cells_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV of labelled cells: image, x0, y0, x1, y1, one 1/0 column per head (empty: unlabelled)[, patient].")
@click.option("--via", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="VIA project (2 or 3): each region a cell, its attributes the labels (type; auer_rod, faggot_cell "
                   "as yes/no or checkbox); file attribute 'patient' groups the pictures.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="--cells/--via: folder of the pictures (default: next to the CSV / project).")
@click.option("--paper", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The paper's published layout: wsi.csv, labeled_cells.csv and the frames (0.0668 µm/px unless "
                   "--image-mpp).")
@click.option("--folders", multiple=True, help=_FOLDERS_HELP)
@click.option("--class-map", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="--folders: CSV 'class, <head>...' with 1/0/empty per head, instead of the built-in classes.")
@click.option("--image-mpp", type=float, default=None,
              help="The pictures' µm per pixel (--cells/--via default: --mpp; --paper: 0.0668; --folders: needed).")
@click.option("--heads", "heads_opt", default="myeloblast,promyelocyte,auer_rod", show_default=True,
              help="Heads to train, comma-separated; faggot_cell too where the labels have it.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle directory.")
@click.option("--mpp", type=float, default=0.5, show_default=True)
@click.option("--area", default="640x480", show_default=True)
@click.option("--backbone", type=click.Choice(["small", "xception"]), default="small", show_default=True,
              help="small: fast, for CPUs and the demo; xception: the paper's (299x299 inputs; slow on a CPU).")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start the backbone from these weights (safetensors or torch state dict of the same architecture, "
                   "e.g. another bundle's cells.safetensors: pretraining, then fine-tuning).")
@click.option("--stain-aug", type=click.Choice(["none", "od", "hed"]), default=_CELLS["stain_aug"], show_default=True,
              help="Colour augmentation: od (optical-density jitter), hed (haematoxylin-eosin-DAB jitter, then od).")
@click.option("--stain-norm", type=click.Choice(["none", "reinhard", "macenko"]), default="none", show_default=True,
              help="Normalise every crop's colours to the training crops' (stored with the heads, applied in scans).")
@click.option("--folds", type=click.IntRange(min=0), default=0, show_default=True,
              help="Patient-grouped cross-validation folds first (3 as in the paper; 0: none).")
@click.option("--trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="Optuna trials over head depth, dropout and learning rate.")
@click.option("--crop-um", type=click.FloatRange(min=4.0), default=_CELLS["crop_um"], show_default=True,
              help="Physical side of a cell's crop, µm.")
@click.option("--crop-px", type=click.IntRange(min=16), default=None,
              help=f"Crop side in pixels (small backbone: {_CELLS['crop_px']}; xception: 299); crops are cut from "
                   "pixels of crop-um/crop-px µm.")
@click.option("--epochs", type=int, default=_CELLS["epochs"], show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=_CELLS["patience"], show_default=True,
              help="Stop after this many epochs without a better validation AUROC.")
@click.option("--ema", type=click.FloatRange(0.0, 0.9999), default=_CELLS["ema"], show_default=True,
              help="Keep an exponential moving average of the weights with this decay (0: off).")
@click.option("--budget", type=float, default=None,
              help="Upper bound on the training time in seconds (all trials and folds); a warning when reached.")
@click.option("--seed", type=int, default=0)
def train_cells_cmd(cohort, cells_csv, via, images, paper, folders, class_map, image_mpp, heads_opt, out, mpp, area,
                    backbone, backbone_weights, stain_aug, stain_norm, folds, trials, crop_um, crop_px, epochs,
                    patience, ema, budget, seed) -> None:
    """Train the cell classifier heads (myeloblast, promyelocyte, auer_rod; faggot_cell) from labelled cells.

    Sources may be combined (a synthetic cohort and real pictures, several folder sets at their own
    pixel sizes); each is split into training and validation cells on its own, by patient where it
    has patients and by picture where not."""
    from workers.classifier import KNOWN_HEADS

    from .train.cells import head_key, train_cells_config
    from .train.sources import training_cells
    from .train.steps import open_or_create, step_cells_from

    src = _cell_sources(cohort, cells_csv, via, images, paper, folders, class_map, image_mpp)
    heads = tuple(dict.fromkeys(head_key(h) for h in heads_opt.split(",") if h.strip()))
    unknown = [h for h in heads if h not in KNOWN_HEADS]
    if not heads or unknown:
        raise click.UsageError(f"--heads: unknown head(s) {', '.join(unknown) or '(none given)'}; choose from "
                               f"{', '.join(KNOWN_HEADS)}")
    geo = _geometry(mpp, area)
    try:
        px = crop_px or (_CELLS["crop_px"] if backbone == "small" else 0)
        cfg = train_cells_config(heads, crop_um, px, backbone)
        tr, va, synthetic, notes = training_cells(src, geo, cfg, seed=seed, log=click.echo)
        bundle = open_or_create(out, geo, synthetic)
        step_cells_from(bundle, tr, va, heads=heads, backbone=backbone, backbone_weights=backbone_weights,
                        trials=trials, folds=folds, epochs=epochs, budget_s=budget, seed=seed,
                        source=src.describe(), stain_aug=stain_aug, stain_norm=stain_norm, notes=notes,
                        config=cfg, ema=ema, patience=patience, log=click.echo)
    except (ValueError, FileNotFoundError) as exc:
        _echo_err(str(exc))
        sys.exit(2)


@train.command("enn")
@click.option("--slides", "slides_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="LABELS.csv: slide, patient, diagnosis (apl/aml/healthy/reactive)[, path].")
@click.option("--paper", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The paper's published layout instead: each frame of wsi.csv a labelled picture (id: patient).")
@click.option("--image-mpp", type=float, default=None, help="--paper: the frames' µm per pixel (default 0.0668).")
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--target-sensitivity", type=float, default=0.95, show_default=True)
@click.option("--min-cells", type=click.IntRange(min=1), default=200, show_default=True,
              help="Fewer counted cells: inconclusive.")
@click.option("--max-areas", type=int, default=12, show_default=True)
@click.option("--target-cells", type=int, default=500, show_default=True)
@click.option("--trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="Optuna trials per net (depth, learning rate, weight decay, epochs), inside each training fold.")
@click.option("--seed", type=int, default=0)
def train_enn_cmd(slides_csv, paper, image_mpp, bundle_dir, target_sensitivity, min_cells, max_areas, target_cells,
                  trials, seed) -> None:
    """Train the slide-level nets on features the bundle computes from labelled slides.

    The slides should be patients the bundle's cell models never saw (their features must look like
    a scan's)."""
    from workers.bundle import load_bundle

    from .paper_layout import paper_entries
    from .train.data import read_labels
    from .train.steps import step_enn

    if (slides_csv is None) == (paper is None):
        raise click.UsageError("give one of --slides LABELS.csv or --paper DIR")
    try:
        entries = read_labels(slides_csv) if slides_csv is not None else paper_entries(paper, image_mpp)
        step_enn(load_bundle(bundle_dir), entries, target_sensitivity=target_sensitivity,
                 min_cells=min_cells, max_areas=max_areas, target_cells=target_cells, seed=seed, trials=trials,
                 log=click.echo)
    except (ValueError, FileNotFoundError) as exc:
        _echo_err(str(exc))
        sys.exit(2)


@train.command("all")
@click.argument("cohort", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle directory.")
@click.option("--mpp", type=float, default=0.5, show_default=True)
@click.option("--area", default="640x480", show_default=True)
@click.option("--detector-epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--cells-epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--detector-budget", type=float, default=None,
              help="Upper bound on the detector's training time in seconds; a warning when reached.")
@click.option("--cells-budget", type=float, default=None,
              help="Upper bound on the cell heads' training time in seconds; a warning when reached.")
@click.option("--min-cells", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--seed", type=int, default=0)
def train_all_cmd(cohort, out, mpp, area, detector_epochs, cells_epochs, detector_budget, cells_budget, min_cells,
                  seed) -> None:
    """Detector, cell heads and slide-level nets from one labelled cohort (fixed epochs: the same seed gives
    the same models on any machine, up to floating-point noise)."""
    from .train.steps import train_all

    train_all(cohort, out, geometry=_geometry(mpp, area), detector_epochs=detector_epochs, cells_epochs=cells_epochs,
              detector_budget_s=detector_budget, cells_budget_s=cells_budget, min_cells=min_cells, seed=seed,
              log=click.echo)


@main.command()
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="VIA project JSON to write.")
@click.option("--mpp", type=float, default=None, help="The pictures' pixel size in µm (resampled to the bundle's).")
@click.option("--score", type=float, default=None, help="Lowest detector score proposed (default: the bundle's threshold).")
def propose(images_dir, bundle_dir, out, mpp, score) -> None:
    """Write the detector's cells on IMAGES_DIR as a VIA project for a hematologist to correct.

    Open it in VGG Image Annotator, fix the boxes, save the project and train again with
    'wsi-apl train detector --via FILE --images IMAGES_DIR --init BUNDLE'.
    """
    from workers.bundle import BundleError

    from .evaluate import propose as run

    try:
        r = run(images_dir, bundle_dir, out, mpp, score, log=click.echo)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        _echo_err(str(exc))
        sys.exit(2)
    click.echo(f"{r['cells']} proposed cells on {r['images']} pictures written to {out} (score >= {r['score_threshold']:.2f})")


# -- evaluate -----------------------------------------------------------------------------------


@main.group()
def evaluate() -> None:
    """Measure a bundle on labelled slides it never saw."""


def _dump(d: dict, as_json: bool, out: Path | None) -> None:
    text = json.dumps(d, indent=2, default=float)
    if out is not None:
        out.write_text(text)
    if as_json:
        click.echo(text)


@evaluate.command("detector")
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--via", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--voc", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--truth", "cohort", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--classes", default=None, help="Keep only boxes with these labels (comma-separated).")
@click.option("--mpp", type=float, default=None,
              help="The pictures' pixel size in µm, to resample them to the bundle's resolution.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def evaluate_detector_cmd(bundle_dir, via, voc, cohort, images, classes, mpp, as_json, out) -> None:
    """COCO AP / AR at IoU 0.5 and 0.5:0.95, with missed and spurious cells per picture or area."""
    from workers.bundle import BundleError

    from .evaluate import evaluate_detector, evaluate_detector_pictures
    from .train.data import read_cohort

    _one_source(via, voc, cohort)
    log = (lambda s: None) if as_json else click.echo
    try:
        if cohort is not None:
            m = evaluate_detector(bundle_dir, read_cohort(cohort), log=log)
        else:
            m = evaluate_detector_pictures(bundle_dir, via, voc, images, _classes(classes), mpp, log=log)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        _echo_err(str(exc))
        sys.exit(2)
    if not as_json:
        click.echo(f"AP@0.5 {m['AP50']:.3f}  AP@0.5:0.95 {m['AP']:.3f}  AR@0.5 {m['AR50']:.3f}  AR {m['AR']:.3f}  "
                   f"({m['images']} images)")
    _dump(m, as_json, out)


@evaluate.command("cells")
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--truth", "cohort", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A labelled cohort (labels.csv + truth/).")
@click.option("--cells", "cells_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV of labelled cells on pictures (as for 'wsi-apl train cells --cells').")
@click.option("--via", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="VIA project whose region attributes label the cells (as for 'wsi-apl train cells --via').")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="--cells/--via: folder of the pictures (default: next to the CSV / project).")
@click.option("--paper", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The paper's published layout (wsi.csv, labeled_cells.csv, frames at 0.0668 µm/px).")
@click.option("--folders", multiple=True, help=_FOLDERS_HELP)
@click.option("--class-map", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="--folders: CSV 'class, <head>...' with 1/0/empty per head, instead of the built-in classes.")
@click.option("--image-mpp", type=float, default=None,
              help="The pictures' µm per pixel (--cells/--via: resampled to the bundle's, default own pixels; "
                   "--paper: default 0.0668; --folders: needed unless DIR:MPP).")
@click.option("--detected", is_flag=True,
              help="--truth: classify the detector's cells (matched to the truth) instead of the truth boxes.")
@click.option("--curves", "curves_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write ROC and precision-recall curves per head as PNG into this folder.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def evaluate_cells_cmd(bundle_dir, cohort, cells_csv, via, images, paper, folders, class_map, image_mpp, detected,
                       curves_dir, as_json, out) -> None:
    """Per-head AUROC / AUPRC with bootstrap 95 % CI and the confusion at each head's threshold; where
    both are labelled, how well the heads tell promyelocytes from blasts."""
    from workers.bundle import BundleError

    from .evaluate import evaluate_cells, evaluate_labelled_cells
    from .train.data import read_cohort

    src = _cell_sources(None, cells_csv, via, images, paper, folders, class_map, image_mpp) \
        if cohort is None or any((cells_csv, via, paper, folders)) else None
    if cohort is not None and src is not None:
        raise click.UsageError("--truth is evaluated on its own (slides and pictures are read differently)")
    if detected and cohort is None:
        raise click.UsageError("--detected needs --truth (the detector's cells are matched to the truth)")
    log = (lambda s: None) if as_json else click.echo
    try:
        if cohort is not None:
            m = evaluate_cells(bundle_dir, read_cohort(cohort), detected=detected, curves_dir=curves_dir, log=log)
        else:
            m = evaluate_labelled_cells(bundle_dir, src, curves_dir, log=log)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        _echo_err(str(exc))
        sys.exit(2)
    _dump(m, as_json, out)


@evaluate.command("enn")
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--slides", "slides_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="LABELS.csv: slide, patient, diagnosis[, path]; a synthetic cohort's truth/ is used when present.")
@click.option("--results", "results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Read the slides' results from this 'wsi-apl scan' output instead of scanning them here.")
@click.option("--max-areas", type=int, default=12, show_default=True, help="Areas per slide when scanning here.")
@click.option("--target-cells", type=int, default=0, show_default=True,
              help="Stop choosing areas at this many expected cells (0: up to --max-areas).")
@click.option("--curves", "curves_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write ROC / PR curves of both nets as PNG into this folder.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def evaluate_enn_cmd(bundle_dir, slides_csv, results_dir, max_areas, target_cells, curves_dir, as_json, out) -> None:
    """Both slide-level nets and the triage decision on labelled slides, with an oracle and subgroups."""
    from .evaluate import evaluate_enn
    from .train.data import read_labels

    m = evaluate_enn(bundle_dir, read_labels(slides_csv), max_areas=max_areas, target_cells=target_cells,
                     results=results_dir, curves_dir=curves_dir, log=(lambda s: None) if as_json else click.echo)
    if not as_json:
        for task in ("apl_vs_aml", "apl_vs_healthy"):
            if task in m:
                t = m[task]
                o = (m.get("oracle") or {}).get(task)
                click.echo(f"{task}: AUROC {t['auroc']:.3f} [{t['auroc_ci'][0]:.3f}, {t['auroc_ci'][1]:.3f}], "
                           f"AUPRC {t['auprc']:.3f}; at the stored threshold {t['threshold']:.3f}: sensitivity "
                           f"{t['sensitivity']:.2f}, specificity {t['specificity']:.2f}"
                           + (f"; oracle AUROC {o['auroc']:.3f}" if o else "")
                           + f"; paper {m['paper'][task]['auroc']:.4f}")
        click.echo(f"triage: {json.dumps(m['triage'])}")
        click.echo(f"subgroups: {json.dumps(m['subgroups'])}")
        if "ci_coverage" in m:
            click.echo(f"CI coverage: {json.dumps(m['ci_coverage'])}")
        for row in m["areas_per_slide"]:
            click.echo(f"  {row['areas']:>2} area(s) per slide (mean {row['mean_areas_used']:.1f} used): "
                       + ", ".join(f"{t} AUROC {row[t]:.3f}" for t in ("apl_vs_aml", "apl_vs_healthy")
                                   if row.get(t) is not None))
        click.echo(m["paper"]["note"])
    _dump(m, as_json, out)


# -- scan / status / triage -----------------------------------------------------------------------


@main.command()
@click.argument("slides_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), envvar="WSI_APL_BUNDLE", required=True,
              help="Model bundle (or $WSI_APL_BUNDLE). There is no default: the lab says which models read its slides.")
@click.option("--allow-synthetic", is_flag=True,
              help="Scan with a bundle trained on synthetic data (the demo, tests); refused without this flag.")
@click.option("--reader", type=click.Choice(["auto", "openslide", "tiffslide", "pil"]), default="auto")
@click.option("--mpp", type=float, default=None, help="µm per pixel for files without a resolution.")
@click.option("--max-areas", type=int, default=12, show_default=True)
@click.option("--target-cells", type=int, default=500, show_default=True)
@click.option("--force", is_flag=True, help="Redo slides already analysed with this bundle.")
@click.option("--scheduler", default=None, help="Use an existing Dask scheduler: tls://HOST:PORT (tcp:// only on loopback, or with --insecure).")
@click.option("--tls-ca-file", type=click.Path(path_type=Path), default=None, help="CA certificate (PEM) of a tls:// scheduler.")
@click.option("--tls-cert", type=click.Path(path_type=Path), default=None, help="Client certificate (PEM) for a tls:// scheduler.")
@click.option("--tls-key", type=click.Path(path_type=Path), default=None, help="Client private key (PEM) for a tls:// scheduler.")
@click.option("--insecure", is_flag=True,
              help="Accept a plain tcp:// --scheduler on another host (unencrypted, unauthenticated: trusted networks only).")
@click.option("--cluster", "cluster_kind", type=click.Choice(["local", "slurm"]), default="local", show_default=True,
              help="local: an embedded LocalCluster (or --scheduler); slurm: Dask workers as SLURM jobs (dask-jobqueue).")
@click.option("--slurm-queue", default=None, help="SLURM partition.")
@click.option("--slurm-account", default=None, help="SLURM account.")
@click.option("--slurm-jobs", type=click.IntRange(min=1), default=1, show_default=True, help="SLURM jobs to start.")
@click.option("--slurm-gpus", type=click.IntRange(min=0), default=1, show_default=True,
              help="GPUs per job (one worker per GPU); 0 for CPU jobs.")
@click.option("--slurm-cores", type=click.IntRange(min=1), default=8, show_default=True, help="CPU cores per job.")
@click.option("--slurm-memory", default="32GB", show_default=True, help="Memory per job.")
@click.option("--slurm-walltime", default="08:00:00", show_default=True, help="Walltime per job.")
@click.option("--workers", type=int, default=None, help="Workers of the embedded LocalCluster.")
@click.option("--max-active-slides", type=click.IntRange(min=1), default=None,
              help="Slides in progress at once (default: twice the workers).")
@click.option("--cases", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV mapping slide file names to case ids (columns slide, case).")
@click.option("--watch", is_flag=True, help="Keep scanning files that appear in the folder (until --deadline or Ctrl-C).")
@click.option("--deadline", default=None,
              help="Stop starting slides at this time (HH:MM, the next one; or +MINUTES, +SECONDSs); the rest are not_analysed.")
@click.option("--settle", "settle_s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="--watch: seconds a file's size must stay unchanged before it is read.")
@click.option("--poll", "poll_s", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="--watch: seconds between listings of the folder.")
@click.option("--on-flag", default=None,
              help="Command run the moment a slide is flagged, with the slide path, case id and suspicion as arguments.")
@click.option("--report/--no-report", "report", default=True, show_default=True,
              help="Keep RESULTS/report/index.html, the expert-review pages, up to date as slides finish.")
@click.option("--occlusion-cells", type=click.IntRange(min=0), default=2, show_default=True,
              help="Occlusion-sensitivity maps per cell gallery, made once when the scan completes (0: none; "
                   "the demo: 9-15 s per slide for 6 maps on a 2-core CPU).")
@click.option("--pseudonymize", is_flag=True,
              help="Name slides in every output (triage.csv, cell store, alerts.log, exports, report) by a keyed "
                   "pseudonym slide-<12 hex> instead of the file name; the key stays in RESULTS/.pseudonym_key and "
                   "'wsi-apl pseudonyms RESULTS SLIDES_DIR' prints the table. Kept by later scans of the folder.")
def scan(slides_dir, out, bundle_dir, allow_synthetic, reader, mpp, max_areas, target_cells, force, scheduler, tls_ca_file, tls_cert,
         tls_key, insecure, cluster_kind, slurm_queue, slurm_account, slurm_jobs, slurm_gpus, slurm_cores, slurm_memory,
         slurm_walltime, workers, max_active_slides, cases, watch, deadline, settle_s, poll_s, on_flag, report,
         occlusion_cells, pseudonymize) -> None:
    """Scan every slide of a folder and write the triage list."""
    from cluster.client import ClusterError, SlurmOptions, TlsFiles
    from workers.bundle import BundleError

    from .ledger import LedgerLocked
    from .scan import ScanOptions, parse_deadline
    from .scan import scan as run_scan

    try:
        deadline_at = parse_deadline(deadline)
    except ValueError as exc:
        _echo_err(str(exc))
        sys.exit(2)
    slurm = None
    if cluster_kind == "slurm":
        slurm = SlurmOptions(queue=slurm_queue, account=slurm_account, jobs=slurm_jobs, gpus_per_job=slurm_gpus,
                             cores=slurm_cores, memory=slurm_memory, walltime=slurm_walltime,
                             log_directory=str(out / "slurm-logs"))
    if deadline_at is not None:
        click.echo(f"Deadline: {time.strftime('%Y-%m-%d %H:%M', time.localtime(deadline_at))}")
    elif watch:
        click.echo("Watching the folder until Ctrl-C (give --deadline HH:MM to stop in time for the morning list)")
    opts = ScanOptions(slides=slides_dir, out=out, bundle=bundle_dir, reader=reader, mpp=mpp, max_areas=max_areas,
                       target_cells=target_cells, force=force, scheduler=scheduler, workers=workers, cases=cases,
                       max_active_slides=max_active_slides, tls=TlsFiles(tls_ca_file, tls_cert, tls_key, insecure),
                       slurm=slurm, watch=watch, deadline=deadline_at, settle_s=settle_s, poll_s=poll_s,
                       on_flag=on_flag, allow_synthetic=allow_synthetic, pseudonymize=pseudonymize, report=report,
                       occlusion_cells=occlusion_cells)
    try:
        summary = run_scan(opts, log=click.echo)
    except (BundleError, LedgerLocked, FileNotFoundError, ValueError, ClusterError) as exc:
        _echo_err(str(exc))
        sys.exit(2)
    bad = sum(v for k, v in summary["counts"].items() if k in (Status.FAILED, Status.NOT_ANALYSED))
    if bad:
        click.echo(f"{bad} slide(s) failed or were not analysed: see the reasons in triage.csv "
                   f"('wsi-apl status {out}')")
    if summary.get("stopped_by"):
        import signal

        click.echo(f"Stopped by {summary['stopped_by']}: the list is written but not final.")
        sys.exit(128 + int(getattr(signal, summary["stopped_by"])))
    sys.exit(1 if bad else 0)


@main.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def status(results: Path, as_json: bool) -> None:
    """Counts per status, throughput, and what failed and why."""
    from .ledger import Ledger
    from .triage import triage_rows

    led = Ledger(results)
    try:
        rows = led.rows()
        listed = {t["file_path"]: t for t in triage_rows(led)}  # the status and reason as listed (stale results)
    finally:
        led.close()
    for r in rows:
        t = listed.get(r["path"]) or {}
        if t.get("status") and t["status"] != r["status"]:
            r["status"], r["error"] = t["status"], t["reason"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    times = [(r["started"], r["finished"]) for r in rows if r["started"] and r["finished"]]
    per_hour = None
    if times:
        span = max(f for _, f in times) - min(s for s, _ in times)
        per_hour = round(3600 * len(times) / span, 1) if span > 0 else None
    slides = [{"path": r["path"], "status": r["status"], "error": r["error"], "attempts": r["attempts"],
               "case": r["case"], "suspicion": (r["result"] or {}).get("suspicion")} for r in rows]
    from .triage import read_state

    state = read_state(results)
    d = {"counts": counts, "slides_per_hour": per_hour, "slides": slides, "scan": state,
         "final": bool(state and state.get("final"))}
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    if state is None:
        click.echo("No scan state recorded (a scan by an older version, or none yet): triage.csv may not be final")
    elif state["state"] == "complete":
        click.echo(f"The scan ended at {state['updated']}: triage.csv is final")
    elif state["state"] in ("running", "stopping"):
        click.echo(f"A scan is {'stopping' if state['state'] == 'stopping' else 'running'} (since {state['started']}): triage.csv is rewritten after every slide "
                   f"({state['slides_done']} done, {state['slides_left']} left, last update {state['updated']})")
    else:
        click.echo(f"The scan was interrupted ({state.get('why') or 'stopped'}); triage.csv holds the slides "
                   f"finished up to {state['updated']}: it is NOT final, run the scan again to finish it")
    click.echo(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no slides yet")
    if per_hour:
        click.echo(f"{per_hour} slides per hour")
    for s in slides:
        if s["status"] in (Status.FAILED, Status.NOT_ANALYSED):
            click.echo(f"  {s['status']}: {s['path']}: {s['error'] or ''}")
    click.echo(DECISION_SUPPORT)


@main.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
def triage(results: Path) -> None:
    """Regenerate RESULTS/triage.csv from the ledger (refused while a scan writes the folder)."""
    from .ledger import Ledger, LedgerLocked
    from .triage import write_triage

    led = Ledger(results)
    try:
        led.lock()
    except LedgerLocked:
        led.close()
        _echo_err(f"{results}: a scan is running and rewrites triage.csv after every slide; "
                  f"'wsi-apl status {results}' shows how far it is")
        sys.exit(1)
    try:
        click.echo(str(write_triage(results, led)))
    finally:
        led.close()
    click.echo(DECISION_SUPPORT)


# -- bundle ------------------------------------------------------------------------------------------


@main.group()
def bundle() -> None:
    """Inspect and verify model bundles."""


@bundle.command("info")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def bundle_info(bundle_dir: Path, as_json: bool) -> None:
    """What a bundle holds: geometry, parts, metrics, provenance."""
    from workers.bundle import BundleError, load_bundle

    try:
        b = load_bundle(bundle_dir, verify=False)
    except BundleError as exc:
        _echo_err(str(exc))
        sys.exit(2)
    s = b.summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"{b.label}")
    res = f"{b.mpp} µm/px" if b.mpp_known else "the pictures' own pixels (no pixel size)"
    click.echo(f"  works at {res} on areas of {b.area_size[0]}x{b.area_size[1]} px; heads {', '.join(b.heads)}")
    for name, p in s["parts"].items():
        click.echo(f"  {name}: {p['file']} sha256 {p['sha256'][:16]}…  trained {p['trained']}")
        if p.get("metrics"):
            click.echo(f"    metrics: {json.dumps(p['metrics'], default=float)[:300]}")


@bundle.command("verify")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def bundle_verify(bundle_dir: Path) -> None:
    """Check every weight file against the sha256 in bundle.json."""
    from workers.bundle import BundleError, load_bundle

    try:
        b = load_bundle(bundle_dir, verify=False)
    except BundleError as exc:
        _echo_err(str(exc))
        sys.exit(2)
    problems = b.verify()
    if problems:
        for p in problems:
            _echo_err(f"{bundle_dir}: {p}")
        sys.exit(1)
    click.echo(f"{bundle_dir}: OK ({len(b.meta.get('parts', {}))} parts verified; id {b.id})")


@bundle.command("import-keras")
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--head", required=True, help="The finding this binary network detects (e.g. promyelocyte).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Bundle directory: created, or the network is added to its cells part as one more head.")
@click.option("--trust", is_flag=True,
              help="Load the file although Keras model files can run code when loaded (legacy .h5 ignores safe "
                   "mode); only for files from a source you trust.")
@click.option("--mpp", type=float, default=None,
              help="Working resolution (µm/px) of a new bundle: the pixel size of the images the network was "
                   "trained on [default: 0.0668, the paper's frames]; an existing bundle keeps its own.")
@click.option("--area", default="2560x1920", show_default=True, help="Area size in pixels of a new bundle.")
@click.option("--positive-class", type=click.IntRange(0, 1), default=1, show_default=True,
              help="Dense(2, softmax) outputs: the index of the finding's class.")
def bundle_import_keras(model_file: Path, head: str, out: Path, trust: bool, mpp, area, positive_class) -> None:
    """Import a Keras Xception cell classifier (.keras or .h5) as one head of a bundle, for workers without TensorFlow.

    One binary network per finding, as in the paper: import each into the same --out. The weights are
    copied into the torch Xception and checked against Keras on random images before anything is written.
    Needs TensorFlow here only: pip install 'wsi-apl[keras]'.
    """
    from workers.bundle import BundleError

    from .keras_import import KerasImportError, import_keras

    try:
        r = import_keras(model_file, head, out, trust, log=click.echo, mpp=mpp, area=_area(area),
                         positive_class=positive_class)
    except (KerasImportError, BundleError) as exc:
        _echo_err(" ".join(str(exc).split()))
        sys.exit(2)
    c = r["check"]
    click.echo(f"{out}: {head} imported (max |Δp| {c['max_abs_diff_prob']:.1e} <= {c['tolerance_prob']:g}); "
               f"heads {', '.join(r['heads'])}")


# -- demo ------------------------------------------------------------------------------------------


@main.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"), show_default=True)
@click.option("--quick", is_flag=True, help="A smaller, faster demo (fewer slides, shorter training).")
def demo(out: Path, quick: bool) -> None:
    """Synthetic cohort → train small models → scan a held-out cohort on a LocalCluster → triage.csv."""
    from .demo import run_demo

    code = run_demo(out, quick=quick, log=click.echo)
    sys.exit(code)


from .report.cli import report_cmd  # noqa: E402  (click only; the report's modules load when it runs)

main.add_command(report_cmd)

from .export_cli import export, pseudonyms  # noqa: E402  (click only; exports load pandas when they run)
from .verify_cli import verdict, verify  # noqa: E402

main.add_command(export)
main.add_command(pseudonyms)
main.add_command(verdict)
main.add_command(verify)

if __name__ == "__main__":  # pragma: no cover
    main()
