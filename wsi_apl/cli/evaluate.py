"""Evaluation on labelled data a bundle never saw: ``evaluate detector|cells|enn``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import FOLDERS_HELP, cell_sources, fail, one_source, parse_classes

# -- evaluate -----------------------------------------------------------------------------------


@click.group()
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

    from ..evaluate import evaluate_detector, evaluate_detector_pictures
    from ..train.data import read_cohort

    one_source(via, voc, cohort)
    log = (lambda s: None) if as_json else click.echo
    try:
        if cohort is not None:
            m = evaluate_detector(bundle_dir, read_cohort(cohort), log=log)
        else:
            m = evaluate_detector_pictures(bundle_dir, via, voc, images, parse_classes(classes), mpp, log=log)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
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
@click.option("--folders", multiple=True, help=FOLDERS_HELP)
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

    from ..evaluate import evaluate_cells, evaluate_labelled_cells
    from ..train.data import read_cohort

    src = cell_sources(None, cells_csv, via, images, paper, folders, class_map, image_mpp) \
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
        fail(str(exc))
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
    from ..evaluate import evaluate_enn
    from ..train.data import read_labels

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
