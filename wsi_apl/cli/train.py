"""Training: ``train detector|cells|enn|all`` and ``propose`` (pre-annotations for VIA)."""

from __future__ import annotations

from pathlib import Path

import click

from ..train.defaults import TRAIN_CELLS_DEFAULTS as _CELLS
from .common import FOLDERS_HELP, cell_sources, fail, geometry, one_source, parse_classes

# -- train ---------------------------------------------------------------------------------------


@click.group()
def train() -> None:
    """Train the models of a bundle (each step adds or replaces its part)."""


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

    from ..train.data import read_cohort
    from ..train.splits import split_by_patient
    from ..train.steps import (
        _synthetic,
        collect_samples,
        open_or_create,
        picture_geometry,
        picture_samples,
        step_detector,
    )

    one_source(via, voc, cohort, paper)
    val_f = 0.15
    try:
        init_b = load_bundle(init) if init else None
        weights = None
        if backbone_weights == "hub":
            from ..train.detector import find_hub_weights

            weights = find_hub_weights(backbone)
            click.echo(f"  torch hub cache: {weights or 'no weights for ' + backbone + ' (starting from scratch)'}")
        elif backbone_weights:
            weights = Path(backbone_weights)
            if not weights.is_file():
                raise click.BadParameter(f"{weights}: no such file", param_hint="--backbone-weights")
        if cohort is not None:
            geo = geometry(mpp or 0.5, area)
            entries = read_cohort(cohort)
            tr, va, te = split_by_patient(entries, (1.0 - val_f - test_fraction, val_f, test_fraction), seed=seed)
            bundle = open_or_create(out, geo, _synthetic(entries))
            train_s = sum(collect_samples(tr, geo, click.echo, seed=seed), [])
            val_s = sum(collect_samples(va, geo, click.echo, n_random=0, seed=seed), [])
            test_s = sum(collect_samples(te, geo, click.echo, n_random=0, seed=seed), [])
            source = f"truth {cohort}"
        else:
            if paper is not None:
                from ..paper_layout import PAPER_MPP

                mpp = mpp or PAPER_MPP
            work = mpp
            if init_b is not None and init_b.mpp_known:
                if mpp is None:
                    raise click.UsageError(f"{init}: works at {init_b.mpp} µm/px; give the pictures' pixel size "
                                           "with --mpp so that they can be resampled to it")
                work = init_b.mpp
            if paper is not None:
                from ..paper_layout import paper_annotations
                from ..train.data import image_samples

                samples = image_samples(paper_annotations(paper), mpp, work)
                click.echo(f"  {len(samples)} frames, {sum(len(s.boxes) for s in samples)} cells ({paper})")
            else:
                samples = picture_samples(via, voc, images, parse_classes(classes), mpp, work, click.echo)
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
        fail(str(exc))


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
@click.option("--folders", multiple=True, help=FOLDERS_HELP)
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

    from ..train.cell_labels import head_key
    from ..train.cells import train_cells_config
    from ..train.sources import training_cells
    from ..train.steps import open_or_create, step_cells_from

    src = cell_sources(cohort, cells_csv, via, images, paper, folders, class_map, image_mpp)
    heads = tuple(dict.fromkeys(head_key(h) for h in heads_opt.split(",") if h.strip()))
    unknown = [h for h in heads if h not in KNOWN_HEADS]
    if not heads or unknown:
        raise click.UsageError(f"--heads: unknown head(s) {', '.join(unknown) or '(none given)'}; choose from "
                               f"{', '.join(KNOWN_HEADS)}")
    geo = geometry(mpp, area)
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
        fail(str(exc))


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

    from ..paper_layout import paper_entries
    from ..train.data import read_labels
    from ..train.steps import step_enn

    if (slides_csv is None) == (paper is None):
        raise click.UsageError("give one of --slides LABELS.csv or --paper DIR")
    try:
        entries = read_labels(slides_csv) if slides_csv is not None else paper_entries(paper, image_mpp)
        step_enn(load_bundle(bundle_dir), entries, target_sensitivity=target_sensitivity,
                 min_cells=min_cells, max_areas=max_areas, target_cells=target_cells, seed=seed, trials=trials,
                 log=click.echo)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


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
    from ..train.steps import train_all

    train_all(cohort, out, geometry=geometry(mpp, area), detector_epochs=detector_epochs, cells_epochs=cells_epochs,
              detector_budget_s=detector_budget, cells_budget_s=cells_budget, min_cells=min_cells, seed=seed,
              log=click.echo)


@click.command()
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

    from ..evaluate import propose as run

    try:
        r = run(images_dir, bundle_dir, out, mpp, score, log=click.echo)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    click.echo(f"{r['cells']} proposed cells on {r['images']} pictures written to {out} (score >= {r['score_threshold']:.2f})")
