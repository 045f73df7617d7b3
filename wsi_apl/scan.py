"""``wsi-apl scan``: every slide of a folder through the cluster, into the store, ledger and triage list.

For each slide: fingerprint (full SHA-256) → skip if already finished with this bundle → area
selection on a worker → one task per area on the workers → aggregation, decision and zarr group on
the client → ``alerts.log`` line when flagged → ledger row. A slide that cannot be read or
analysed is marked failed with the reason and the batch goes on; ``triage.csv`` is rewritten from
the ledger at the end whatever happened, so no slide seen tonight is missing from it.

Only a few slides are in progress at once (area tasks of started slides go before new selections),
so results, alerts and ledger rows arrive slide by slide through the night, and the client holds
the cell tables of those few slides only.
"""

from __future__ import annotations

import collections
import csv
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cluster.client import register_bundles, start_cluster
from cluster.plugin import area_task, select_task
from cluster.submit import TaskWindow
from tile_selector.slide import REFUSED_FORMATS, SLIDE_EXTENSIONS
from workers.bundle import load_bundle

from .enn import SlideNets
from .ledger import Ledger, fingerprint
from .pipeline import DECISION_SUPPORT, SlideResult, aggregate
from .store import SLIDE_ALLOWLIST, clean_staging, remove_slide_group, write_slide_group
from .triage import write_triage

#: Slide formats a lab may drop in the folder that no reader here understands: listed so that they
#: get a ``failed`` row with the reason instead of vanishing from the triage list.
UNREADABLE_SLIDE_EXTENSIONS = set(REFUSED_FORMATS) | {".isyntax", ".qptiff", ".kfb", ".sdpc", ".tmap", ".zvi"}
SCAN_EXTENSIONS = SLIDE_EXTENSIONS | UNREADABLE_SLIDE_EXTENSIONS - {".ets"}


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
    cases: Path | None = None
    max_in_flight: int | None = None
    max_active_slides: int | None = None


@dataclass
class _SlideJob:
    fp: str
    path: Path
    names: list[Path]
    size: int
    started: float = 0.0
    selection: object = None
    tables: list = field(default_factory=list)
    expected: int = 0
    failed: bool = False


def list_slides(folder: Path) -> tuple[list[Path], list[Path]]:
    """(slide-like entries, other files) of ``folder``, sorted; folders named like slides are included
    so that they are reported. Hidden entries and ordinary subfolders are skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of slides")
    slides, others = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.suffix.lower() in SCAN_EXTENSIONS:
            slides.append(p.resolve())
        elif p.is_file():
            others.append(p)
    return slides, others


def read_cases(path: Path | None) -> dict[str, str]:
    """``slide`` (file name) → case id from a CSV with columns slide, case."""
    if path is None:
        return {}
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"slide", "case"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: needs columns 'slide' and 'case'")
        return {row["slide"]: row["case"] for row in reader}


def group_name(path: Path, fp: str) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.stem)
    return f"{stem}-{fp[:8]}"


def scan(opts: ScanOptions, log: Callable[[str], None] = print) -> dict:
    """Run the batch; returns a summary (counts per status, timings, paths)."""
    t_start = time.time()
    bundle = load_bundle(opts.bundle)
    bundle.require("detector", "cells", "slide_nets")
    _ = bundle.mpp  # a bundle trained on pictures without a pixel size cannot scan: say so before any slide
    nets = SlideNets.from_bundle(bundle)
    if bundle.synthetic:
        log(f"WARNING: bundle {bundle.name} was trained on synthetic data: demo model, not for diagnosis.")
    cases = read_cases(opts.cases)
    files, others = list_slides(opts.slides)
    ledger = Ledger(opts.out)
    ledger.lock()
    clean_staging(opts.out)
    skipped = 0
    try:
        jobs: dict[str, _SlideJob] = {}
        log(f"{len(files)} slide file(s) in {opts.slides}; bundle {bundle.label}")
        if others:
            log(f"{len(others)} other file(s) ignored (not slide formats): "
                + ", ".join(p.name for p in others[:5]) + (" …" if len(others) > 5 else ""))
        for p in files:
            case = cases.get(p.name, "")
            if p.is_dir():
                ledger.see_file(str(p), p.name, None, case,
                                error=f"{p}: is a folder, not a slide file (pass the slide file itself)")
                continue
            if p.suffix.lower() in UNREADABLE_SLIDE_EXTENSIONS:
                cause, fix = REFUSED_FORMATS.get(p.suffix.lower(), (f"{p.suffix} slides are not supported",
                                                                    "export the slide as OME-TIFF or SVS"))
                ledger.see_file(str(p), p.name, None, case, error=f"{p}: {cause} ({fix})")
                continue
            try:
                fp = fingerprint(p)
            except OSError as exc:
                ledger.see_file(str(p), p.name, None, case, error=f"{p}: cannot read the file ({exc})")
                continue
            ledger.see_file(str(p), p.name, fp, case)
            if not opts.force and ledger.is_done(fp, bundle.id):
                skipped += 1
                continue
            if fp in jobs:
                jobs[fp].names.append(p)
                continue
            jobs[fp] = _SlideJob(fp, p, [p], p.stat().st_size)
        if skipped:
            log(f"{skipped} slide(s) already analysed with this bundle: skipped (use --force to redo)")
        if jobs:
            _run_jobs(jobs, bundle, nets, ledger, opts, log)
    finally:
        # whatever happened above, tonight's list is rewritten from the ledger: every slide seen has a row
        out = write_triage(opts.out, ledger)
        counts: dict[str, int] = {}
        for r in ledger.rows():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        ledger.close()
    elapsed = time.time() - t_start
    summary = {"counts": counts, "seconds": round(elapsed, 1), "triage": str(out),
               "store": str(opts.out / "cells.zarr"), "skipped": skipped, "bundle": bundle.label}
    log("")
    log("Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" in {elapsed:.0f} s")
    log(f"Triage list: {out}")
    log(DECISION_SUPPORT)
    if bundle.synthetic:
        log("The bundle is a demo model trained on synthetic data: not for diagnosis.")
    return summary


def _run_jobs(jobs: dict[str, _SlideJob], bundle, nets, ledger: Ledger, opts: ScanOptions,
              log: Callable[[str], None]) -> None:
    handle = start_cluster(opts.scheduler, opts.workers)
    log(f"Dask cluster: {handle.workers} worker(s){' with GPUs' if handle.gpus else ' (CPU)'}; "
        f"dashboard {handle.dashboard}")
    run = uuid.uuid4().hex[:8]
    try:
        register_bundles(handle, {bundle.id: str(bundle.path.resolve())}, remote=bool(opts.scheduler))
        window = TaskWindow(handle.client, opts.max_in_flight or max(4, 3 * handle.workers), gpu=handle.gpus > 0)
        selector = {"max_areas": opts.max_areas, "target_cells": opts.target_cells}
        max_active = opts.max_active_slides or max(2, 2 * handle.workers)
        waiting = collections.deque(jobs.values())
        active = 0
        attempts: dict[str, int] = {}

        def admit() -> None:
            nonlocal active
            while waiting and active < max_active:
                job = waiting.popleft()
                ledger.start(job.fp, bundle.id, job.size)
                attempts[job.fp] = (ledger.slide(job.fp) or {}).get("attempts", 1)
                job.started = time.time()
                window.add(("select", job.fp), f"select-{job.fp[:16]}-{bundle.id[:8]}-{run}-{attempts[job.fp]}",
                           select_task, str(job.path), bundle.area_size, bundle.mpp, selector, opts.reader, opts.mpp)
                active += 1

        admit()
        t0 = time.time()
        n_done = areas_done = cells_done = 0
        for done in window.results():
            kind, fp = done.tag[0], done.tag[1]
            job = jobs[fp]
            if job.failed:
                continue
            finished = False
            if not done.ok:
                job.failed = True
                window.cancel(lambda tag, fp=fp: tag[1] == fp)
                _finish_failed(job, done.error, ledger, bundle, opts, log)
                finished = True
            elif kind == "select":
                job.selection = sel = done.value
                job.expected = len(sel.areas) if sel.status == "ok" else 0
                for a in sel.areas if job.expected else []:
                    window.add(("area", fp, a.index),
                               f"area-{fp[:16]}-{bundle.id[:8]}-{run}-{attempts[fp]}-{a.index}", area_task,
                               str(job.path), a.box, a.index, bundle.id, opts.reader, opts.mpp, a.size,
                               gpu_task=True, front=True)
                finished = job.expected == 0
            else:
                job.tables.append(done.value)
                areas_done += 1
                cells_done += len(done.value)
                finished = len(job.tables) == job.expected
            if not finished:
                continue
            if not job.failed:
                try:
                    _finish(job, bundle, nets, ledger, opts, log)
                except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the batch
                    job.failed = True
                    _finish_failed(job, f"could not finish the analysis ({type(exc).__name__}: {exc})", ledger,
                                   bundle, opts, log)
            job.selection, job.tables = None, []
            active -= 1
            n_done += 1
            admit()
            el = max(1e-6, time.time() - t0)
            eta = (len(jobs) - n_done) * el / n_done
            log(f"  [{n_done}/{len(jobs)} slides] {areas_done / el:.2f} areas/s, {cells_done / el:.0f} cells/s, "
                f"{3600 * n_done / el:.0f} slides/h" + (f", ETA {eta / 60:.1f} min" if n_done < len(jobs) else ""))
    finally:
        handle.close()


def _provenance(bundle, job: _SlideJob) -> dict:
    import numpy
    import torch
    import zarr

    from . import __version__

    return {"bundle_id": bundle.id, "bundle": bundle.label, "wsi_apl": __version__, "torch": torch.__version__,
            "zarr": zarr.__version__, "numpy": numpy.__version__, "fingerprint": job.fp,
            "seconds": round(time.time() - job.started, 2)}


def _slide_facts(job: _SlideJob, opts: ScanOptions) -> dict:
    from tile_selector.errors import SlideError
    from tile_selector.slide import open_slide_cached

    try:
        info = open_slide_cached(job.path, opts.reader, opts.mpp).info()
    except (SlideError, OSError):  # facts are optional: the slide's status already says what happened
        return {}
    return {k: info[k] for k in SLIDE_ALLOWLIST if k in info}


def _finish(job: _SlideJob, bundle, nets, ledger: Ledger, opts: ScanOptions, log) -> None:
    sel = job.selection
    result, cols, _feats = aggregate(job.path.name, str(job.path), sel, job.tables, bundle, nets)
    result.fingerprint = job.fp
    result.timings = {"seconds": round(time.time() - job.started, 2)}
    group = group_name(job.path, job.fp)
    attrs = {
        "result": result.to_json(),
        "areas": [a.to_json() for a in sel.areas],
        "rejected": dict(sel.rejected), "candidates": sel.candidates, "qc": sel.qc,
        "selection_status": sel.status, "selection_reason": sel.reason,
        "slide": _slide_facts(job, opts), "provenance": _provenance(bundle, job),
        "decision_support": DECISION_SUPPORT,
    }
    write_slide_group(opts.out, group, cols, attrs)
    if result.status == "flagged":
        _alert(opts.out, job, result)  # before the ledger says done: a crash in between repeats, never loses it
    ledger.finish(job.fp, result.status, result.to_json(), group)
    extra = f" (suspicion {result.suspicion:.2f})" if result.suspicion is not None else ""
    why = f": {result.reason}" if result.reason else ""
    log(f"  {job.path.name}: {result.status}{extra}, {result.cells} cells in {result.areas} areas{why}")


def _finish_failed(job: _SlideJob, error: str, ledger: Ledger, bundle, opts: ScanOptions, log) -> None:
    result = SlideResult(slide=job.path.name, path=str(job.path), status="failed", reason=error,
                         bundle=bundle.label, scanned_at=time.strftime("%Y-%m-%d %H:%M:%S"), fingerprint=job.fp)
    remove_slide_group(opts.out, group_name(job.path, job.fp))  # an older result must not outlive this failure
    ledger.fail(job.fp, error, result.to_json())
    log(f"  {job.path.name}: failed: {error}")


def _alert(out: Path, job: _SlideJob, result: SlideResult) -> None:
    line = (f"{time.strftime('%Y-%m-%d %H:%M:%S')}\tFLAGGED\t{job.path.name}\tsuspicion={result.suspicion:.3f}"
            f"\t{DECISION_SUPPORT}\n")
    with open(out / "alerts.log", "a", encoding="utf-8") as f:
        f.write(line)
