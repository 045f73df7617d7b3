"""``wsi-apl scan``: every slide of a folder through the cluster, into the store, ledger and triage list.

For each slide: fingerprint (full SHA-256) → skip if already finished with this bundle → area
selection on a worker → one task per area on the workers → aggregation, decision and zarr group on
the client → ``alerts.log`` line and the site's ``--on-flag`` command when flagged → ledger row. A
slide that cannot be read or analysed is marked failed with the reason and the batch goes on;
``triage.csv`` is rewritten from the ledger at the end whatever happened, so no slide seen tonight
is missing from it.

Only a few slides are in progress at once (area tasks of started slides go before new selections),
so results, alerts and ledger rows arrive slide by slide through the night, and the client holds
the cell tables of those few slides only.

Overnight mode (``watch``): files that appear in the folder are scanned too, once their size and
modification time have been still for ``settle_s``; at the ``deadline`` the slides in hand are
finished and every slide seen but not started gets a ``not_analysed`` row.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.client import SlurmOptions, TlsFiles
from workers.bundle import BundleError, load_bundle

from .batch import Batch, update_report
from .enn import SlideNets
from .inbox import SlideFolder, read_cases
from .ledger import Ledger
from .pipeline import few_apl_slides
from .privacy import META_KEY, Names, create_key, read_key
from .status import DECISION_SUPPORT
from .store import clean_staging
from .triage import triage_rows, write_triage


@dataclass
class ScanOptions:
    slides: Path
    out: Path
    bundle: Path
    reader: str = "auto"
    mpp: float | None = None
    max_areas: int = 12
    target_cells: int = 500
    force: bool = False
    scheduler: str | None = None
    workers: int | None = None
    torch_threads: int | None = None    # embedded cluster: torch threads per worker (default: cores / workers)
    cases: Path | None = None
    max_in_flight: int | None = None
    max_active_slides: int | None = None
    tls: TlsFiles | None = None
    slurm: SlurmOptions | None = None
    watch: bool = False
    deadline: float | None = None      # epoch seconds (see parse_deadline)
    settle_s: float = 30.0             # --watch: a file is read once unchanged for this long
    poll_s: float = 10.0               # --watch: how often the folder is listed
    on_flag: str | None = None         # the site's command, run once per flagged slide
    area_retries: int = 1              # an area task that raises is retried this often, then its slide fails
    stall_s: float = 3600.0            # no task finished for this long while some run: their slides fail
    stop_grace_s: float = 120.0        # SIGTERM: wait at most this long for the tasks in hand
    scheduler_lost_s: float = 60.0     # the client cut off from its scheduler this long: the scan ends
    allow_synthetic: bool = False      # a bundle trained on synthetic data scans only when asked (demo, tests)
    pseudonymize: bool = False         # outputs name slides by keyed pseudonyms (wsi_apl/privacy.py)
    report: bool = True                # keep RESULTS/report/ (the expert-review HTML) up to date
    occlusion_cells: int = 2           # occlusion maps per gallery, made once at the end of the scan (0: none)


def _naming(opts: ScanOptions, ledger: Ledger, log: Callable[[str], None]) -> Names:
    """How this folder's outputs name slides. ``--pseudonymize`` sticks to a folder (its key and the
    ledger's ``meta`` say so, and later scans keep it); it is refused on a folder whose outputs already
    carry file names, which it could not take back."""
    if ledger.meta().get(META_KEY) == "1":
        if not opts.pseudonymize:
            log(f"{opts.out} pseudonymizes slide names (an earlier scan was given --pseudonymize): so does this scan")
        return Names(read_key(opts.out))
    if not opts.pseudonymize:
        return Names()
    if ledger.rows():
        raise ValueError(f"{opts.out}: already holds results that name slides by their file names, which "
                         "--pseudonymize cannot take back out of its outputs; scan into a new, empty --out folder")
    key = create_key(opts.out)
    ledger.set_meta(META_KEY, "1")
    log(f"Slide names are pseudonymized in every output; 'wsi-apl pseudonyms {opts.out} {opts.slides}' prints the "
        "table for the lab's records")
    return Names(key)


def scan(opts: ScanOptions, log: Callable[[str], None] = print) -> dict:
    """Run the batch; returns a summary (counts per status, timings, paths)."""
    t_start = time.time()
    bundle = load_bundle(opts.bundle)
    bundle.require("detector", "cells", "slide_nets")
    _ = bundle.mpp  # a bundle trained on pictures without a pixel size cannot scan: say so before any slide
    nets = SlideNets.from_bundle(bundle)
    if bundle.synthetic and not opts.allow_synthetic:
        raise BundleError(f"{opts.bundle}: bundle {bundle.name} was trained on synthetic data (a demo model, not for "
                          "diagnosis); give the bundle your lab trained on real slides, or pass --allow-synthetic "
                          "to scan with it anyway (the demo, tests)")
    if bundle.synthetic:
        log(f"WARNING: bundle {bundle.name} was trained on synthetic data: demo model, not for diagnosis.")
    few = few_apl_slides((bundle.part("slide_nets") or {}).get("decision") or {})
    if few:
        log(f"WARNING: {few}")
    cases = read_cases(opts.cases)
    folder = SlideFolder(opts.slides, opts.settle_s if opts.watch else 0.0)
    ledger = Ledger(opts.out)
    ledger.lock()
    try:
        names = _naming(opts, ledger, log)
    except BaseException:
        ledger.close()
        raise
    ledger.set_bundle(bundle.id, bundle.label)  # results of other bundles are no longer current
    ledger.set_meta("bundle_path", json.dumps(str(Path(opts.bundle).resolve())))  # for 'wsi-apl report'
    clean_staging(opts.out)
    batch = Batch(opts, bundle, nets, ledger, cases, folder, log, names)
    alerts = batch.alerts
    ended_well = False
    restore = _catch_stop_signals(batch)
    try:
        batch.discover(first=True)
        if batch.skipped:
            log(f"{batch.skipped} slide(s) already analysed with this bundle: skipped (use --force to redo)")
        batch.checkpoint()
        if batch.jobs or opts.watch:
            batch.run()
        ended_well = True
    finally:
        restore()
        alerts.wait()
        batch.close_unfinished()
        # whatever happened above, tonight's list is rewritten from the ledger: every slide seen has a row
        rows = triage_rows(ledger)
        out = write_triage(opts.out, rows=rows)
        exc = sys.exc_info()[1]
        stopped_by = signal.Signals(batch.stop_signal).name if batch.stop_signal else ""
        if stopped_by:
            state, why = "interrupted", f"stopped by {stopped_by}"
        elif ended_well:
            state, why = "complete", ""
        else:
            state, why = "interrupted", f"{type(exc).__name__}: {exc}" if exc is not None else "stopped"
        counts = batch.checkpoint(state, why, triage=False, rows=rows)
        ledger.close()
        if opts.report and opts.occlusion_cells > 0 and state == "complete":
            update_report(opts, log, only=None, occlusion=True)  # every page once more, with occlusion maps
    elapsed = time.time() - t_start
    summary = {"counts": counts, "seconds": round(elapsed, 1), "triage": str(out),
               "store": str(opts.out / "cells.zarr"), "skipped": batch.skipped, "bundle": bundle.label,
               "areas": batch.areas_done, "cells": batch.cells_done, "workers": batch.n_workers,
               "bytes_to_workers": batch.bytes_submitted, "area_tasks": batch.area_tasks,
               "stage_seconds": {k: round(v, 3) for k, v in batch.stage_seconds.items()},
               # from the first task submitted to the last result (without starting and stopping the cluster)
               "analysis_seconds": round(max(0.0, batch.t_end - batch.t0), 2) if batch.t0 else 0.0,
               "stopped_by": stopped_by}
    log("")
    log("Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" in {elapsed:.0f} s")
    log(f"Triage list: {out}")
    if opts.report and (opts.out / "report" / "index.html").exists():
        log(f"Expert-review report: {opts.out / 'report' / 'index.html'} (open it in a browser; works offline)")
    log(DECISION_SUPPORT)
    if bundle.synthetic:
        log("The bundle is a demo model trained on synthetic data: not for diagnosis.")
    return summary


def _catch_stop_signals(batch: "Batch") -> Callable[[], None]:
    """SIGTERM (a service manager, ``kill``) stops the batch in order: no new slide or area, the tasks
    in hand finish, the list is written, and the exit status is not zero. A second SIGTERM stops at
    once (the list is still written). Returns the function that puts the old handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum, _frame):
        if batch.stop_signal is not None:
            raise SystemExit(128 + signum)
        batch.stop_signal = signum

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM,)}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore


