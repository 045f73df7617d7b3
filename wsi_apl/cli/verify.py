"""``wsi-apl verdict`` and ``wsi-apl verify``: the click side of wsi_apl/verify.py (heavy imports stay
inside the commands)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import fail

_RESULTS = click.Path(exists=True, file_okay=False, path_type=Path)



@click.command()
@click.argument("results", type=_RESULTS)
@click.argument("slide")
@click.option("--says", type=click.Choice(["apl", "not_apl", "unreadable"]), required=True,
              help="The expert's finding on the slide (unreadable: no judgement possible; left out of the figures).")
@click.option("--comment", default="", help="Free text kept with the verdict.")
def verdict(results: Path, slide: str, says: str, comment: str) -> None:
    """Record an expert's verdict on SLIDE in RESULTS/verdicts/ (one file per slide; a new one replaces it).

    SLIDE: its name in triage.csv's slide column (file name or pseudonym), its file name, or the first digits
    (at least 6) of its fingerprint."""
    from ..verify import write_verdict

    try:
        path, old = write_verdict(results, slide, says, comment)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    click.echo(f"{path}: {says}" + (f" (replaces '{old['says']}' of {old['at']})" if old else ""))


@click.command()
@click.argument("results", nargs=-1, required=True, type=_RESULTS)
@click.option("--bundle", "bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The bundle that made the results: its thresholds and validation figures are the reference.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def verify(results: tuple[Path, ...], bundle_dir: Path, as_json: bool) -> None:
    """Sensitivity, specificity and PPV of the tool on the verdicts of RESULTS folders (one bundle), with
    95 % Wilson intervals, and drift against the bundle's validation slides.

    Flagged counts as positive, not_flagged as negative; inconclusive, failed and not_analysed slides are
    counted apart, never as negatives. Verdicts 'unreadable' are left out and counted."""
    from workers.bundle import BundleError, load_bundle

    from ..verify import report_lines
    from ..verify import verify as run

    try:
        r = run(list(results), load_bundle(bundle_dir, verify=False))
    except (ValueError, BundleError, OSError) as exc:
        fail(" ".join(str(exc).split()))
    if as_json:
        click.echo(json.dumps(r, indent=2, default=float))
        return
    for line in report_lines(r):
        click.echo(line)
    for p in r["verdicts"]["not_verdicts"]:
        click.echo(f"warning: {p}", err=True)
