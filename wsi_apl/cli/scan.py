"""The batch scan and its results: ``scan``, ``status``, ``triage``, ``demo``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..status import DECISION_SUPPORT, Status
from .common import echo_err, fail

# -- scan / status / triage -----------------------------------------------------------------------


@click.command()
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
@click.option("--torch-threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per worker of the embedded LocalCluster (default: the cores over the workers).")
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
         slurm_walltime, workers, torch_threads, max_active_slides, cases, watch, deadline, settle_s, poll_s, on_flag, report,
         occlusion_cells, pseudonymize) -> None:
    """Scan every slide of a folder and write the triage list."""
    from cluster.client import ClusterError, SlurmOptions, TlsFiles
    from workers.bundle import BundleError

    from ..inbox import parse_deadline
    from ..ledger import LedgerLocked
    from ..scan import ScanOptions
    from ..scan import scan as run_scan

    try:
        deadline_at = parse_deadline(deadline)
    except ValueError as exc:
        fail(str(exc))
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
                       target_cells=target_cells, force=force, scheduler=scheduler, workers=workers,
                       torch_threads=torch_threads, cases=cases,
                       max_active_slides=max_active_slides, tls=TlsFiles(tls_ca_file, tls_cert, tls_key, insecure),
                       slurm=slurm, watch=watch, deadline=deadline_at, settle_s=settle_s, poll_s=poll_s,
                       on_flag=on_flag, allow_synthetic=allow_synthetic, pseudonymize=pseudonymize, report=report,
                       occlusion_cells=occlusion_cells)
    try:
        summary = run_scan(opts, log=click.echo)
    except (BundleError, LedgerLocked, FileNotFoundError, ValueError, ClusterError) as exc:
        fail(str(exc))
    bad = sum(v for k, v in summary["counts"].items() if k in (Status.FAILED, Status.NOT_ANALYSED))
    if bad:
        click.echo(f"{bad} slide(s) failed or were not analysed: see the reasons in triage.csv "
                   f"('wsi-apl status {out}')")
    if summary.get("stopped_by"):
        import signal

        click.echo(f"Stopped by {summary['stopped_by']}: the list is written but not final.")
        sys.exit(128 + int(getattr(signal, summary["stopped_by"])))
    sys.exit(1 if bad else 0)


@click.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def status(results: Path, as_json: bool) -> None:
    """Counts per status, throughput, and what failed and why."""
    from ..ledger import Ledger
    from ..triage import triage_rows

    led = Ledger(results)
    try:
        rows = led.rows()
        # the status and reason as listed (stale results), from the same read of the ledger
        listed = {t["file_path"]: t for t in triage_rows(led, rows)}
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
    from ..triage import read_state

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


@click.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
def triage(results: Path) -> None:
    """Regenerate RESULTS/triage.csv from the ledger (refused while a scan writes the folder)."""
    from ..ledger import Ledger, LedgerLocked
    from ..triage import write_triage

    led = Ledger(results)
    try:
        led.lock()
    except LedgerLocked:
        led.close()
        echo_err(f"{results}: a scan is running and rewrites triage.csv after every slide; "
                  f"'wsi-apl status {results}' shows how far it is")
        sys.exit(1)
    try:
        click.echo(str(write_triage(results, led)))
    finally:
        led.close()
    click.echo(DECISION_SUPPORT)


# -- demo ------------------------------------------------------------------------------------------


@click.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"), show_default=True)
@click.option("--quick", is_flag=True, help="A smaller, faster demo (fewer slides, shorter training).")
def demo(out: Path, quick: bool) -> None:
    """Synthetic cohort → train small models → scan a held-out cohort on a LocalCluster → triage.csv."""
    from ..demo import run_demo

    code = run_demo(out, quick=quick, log=click.echo)
    sys.exit(code)
