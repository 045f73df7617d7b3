"""``wsi-apl report RESULTS``: rebuild the whole expert-review report of a results folder."""

from __future__ import annotations

from pathlib import Path

import click

from .common import fail


@click.command("report")
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The bundle folder that scanned RESULTS (thresholds, occlusion maps); default: the one the "
                   "ledger names.")
@click.option("--no-occlusion", is_flag=True, help="Skip the occlusion maps (the slowest part).")
def report_cmd(results: Path, bundle_dir: Path | None, no_occlusion: bool) -> None:
    """Write RESULTS/report/: an offline HTML report for expert review (index and one page per slide)."""
    from ..report.build import build_report
    from ..status import DECISION_SUPPORT
    from ..triage import TRIAGE

    if not (results / TRIAGE).exists():
        fail(f"{results}: no {TRIAGE} here; run 'wsi-apl scan SLIDES --out {results}' first")
    stats = build_report(results, None, log=lambda s: None, bundle=bundle_dir, occlusion=not no_occlusion)
    per = sum(stats.seconds) / len(stats.seconds) if stats.seconds else 0.0
    click.echo(str(stats.index))
    click.echo(f"{stats.mb:.2f} MB, {stats.pages} slide page(s), {per:.1f} s per slide")
    if stats.occlusion_s:
        click.echo(f"occlusion maps: {sum(stats.occlusion_s) / len(stats.occlusion_s):.1f} s per slide "
                   f"({len(stats.occlusion_s)} slide(s))")
    click.echo(DECISION_SUPPORT)
