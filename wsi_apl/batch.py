"""One scan's slides in flight (:class:`Batch`): discovery, admission to the cluster, results,
checkpoints, the deadline and stop signals; and what the client does when a slide's last area is
back (:func:`finish`: the outcome of :class:`wsi_apl.pipeline.SlideAnalysis`, then store, alert and
ledger). :func:`wsi_apl.scan.scan` sets it up and ends it.
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.client import ClusterError, register_bundles, start_cluster
from cluster.plugin import area_task, select_task
from cluster.submit import TaskWindow
from tile_selector.slide import REFUSED_FORMATS

from .alerts import Alerts
from .inbox import SCAN_EXTENSIONS, UNREADABLE_SLIDE_EXTENSIONS, SlideFolder, is_dicom_file, slide_store
from .ledger import Ledger, fingerprint
from .pipeline import SlideAnalysis, SlideResult
from .privacy import Names
from .status import DECISION_SUPPORT, Status
from .store import remove_slide_group, write_slide_group
from .triage import triage_rows, write_state, write_triage

if TYPE_CHECKING:
    from .scan import ScanOptions


@dataclass
class SlideJob:
    fp: str
    path: Path
    names: list[Path]
    size: int
    case: str = ""
    mtime_ns: int = 0  # with size, as when the fingerprint was taken: a change later means mixed pixels
    started: float = 0.0
    selection: object = None
    tables: list = field(default_factory=list)
    expected: int = 0
    failed: bool = False
    finished: bool = False


def group_name(path: Path, fp: str, names: Names | None = None) -> str:
    """The zarr group of a slide (``names``: the folder's naming; pseudonymized, the pseudonym's)."""
    return (names or Names()).group(path, fp)


def update_report(opts: ScanOptions, log: Callable[[str], None], only: list[str] | None, occlusion: bool) -> None:
    """Rewrite RESULTS/report/ (index, and the pages of ``only`` and of rows that changed; None: all).

    The report is derived from triage.csv and the cell store, so its failure is a warning: it never
    stops the batch, and ``wsi-apl report RESULTS`` rebuilds it."""
    try:
        from .report import write_report

        write_report(opts.out, only=only, log=lambda _s: None, bundle=Path(opts.bundle), occlusion=occlusion,
                     occlusion_cells=max(1, opts.occlusion_cells))
    except Exception as exc:  # noqa: BLE001 - a derived page must not stop the analysis
        log(f"WARNING: could not update the report in {opts.out / 'report'} ({type(exc).__name__}: {exc}); "
            f"'wsi-apl report {opts.out}' rebuilds it")


class Batch:
    """One scan's slides in flight: discovery, admission, results, deadline."""

    def __init__(self, opts: ScanOptions, bundle, nets, ledger: Ledger, cases: dict[str, str], folder: SlideFolder,
                 log: Callable[[str], None], names: Names | None = None):
        self.opts, self.bundle, self.ledger, self.cases = opts, bundle, ledger, cases
        # the client's part of the method; the workers run the selection and the areas (cluster.plugin)
        self.analysis = SlideAnalysis(bundle, nets, reader=opts.reader, slide_mpp=opts.mpp)
        self.folder, self.log = folder, log
        self.names = names or Names()
        self.alerts = Alerts(opts.out, opts.on_flag, log, names=self.names)
        self.jobs: dict[str, SlideJob] = {}
        self.waiting: collections.deque[SlideJob] = collections.deque()
        self.skipped = 0
        self.active = 0
        self.n_done = self.areas_done = self.cells_done = 0
        self.n_workers = 0
        self.bytes_submitted = 0
        self.area_tasks = 0
        self.t0 = self.t_end = 0.0  # first task submitted, last result in (epoch seconds)
        self.stage_seconds: dict[str, float] = collections.defaultdict(float)
        self.closed = False  # the deadline passed: no new slide is started
        self.stop_signal: int | None = None  # SIGTERM received: finish the tasks in hand, write the list, stop
        self.stop_by: float | None = None
        self.attempts: dict[str, int] = {}
        self.changed: dict[Path, int] = {}  # files that changed while they were read, and how often
        self.window: TaskWindow | None = None
        self.started_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")

    # -- the list, current after every slide --------------------------------------------------------
    def checkpoint(self, state: str = "running", why: str = "", triage: bool = True,
                   rows: list[dict] | None = None) -> dict[str, int]:
        """Rewrite triage.csv and scan_state.json from the ledger (after every finished slide, so a
        killed scan leaves a list as current as its last slide); returns the counts per status.
        ``rows``: the list's rows when the caller has just read them."""
        if rows is None:
            rows = triage_rows(self.ledger)  # one read of the ledger for the list and the counts
        counts = dict(collections.Counter(r["status"] for r in rows))
        now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        try:
            if triage:
                write_triage(self.opts.out, rows=rows)
            left = len(self.waiting) + self.active
            write_state(self.opts.out, {
                "state": state, "why": why, "started": self.started_at, "updated": now, "pid": os.getpid(),
                "bundle": self.bundle.label, "slides_done": self.n_done, "slides_left": left,
                "skipped_already_done": self.skipped, "counts": counts,
                "final": state == "complete",
                "note": DECISION_SUPPORT})
        except OSError as exc:  # a full disk must not stop the analysis; the final write retries
            self.log(f"WARNING: could not rewrite the triage list in {self.opts.out} ({exc})")
        if triage and self.opts.report:
            update_report(self.opts, self.log, only=[], occlusion=False)  # the pages of what changed
        return counts

    # -- finding slides -----------------------------------------------------------------------
    def discover(self, first: bool = False) -> int:
        """Register what is new in the folder; returns the number of new jobs."""
        ready, others = self.folder.poll()
        if first:
            self.log(f"{len(ready)} slide file(s) in {self.opts.slides}; bundle {self.bundle.label}"
                     + ("; watching for more" if self.opts.watch else ""))
        if others:
            self.log(f"{len(others)} side file(s) ignored (never slides): "
                     + ", ".join(p.name for p in others[:5]) + (" …" if len(others) > 5 else ""))
        n = 0
        for p in ready:
            job = self._register(p)
            if job is not None:
                self.jobs[job.fp] = job
                self.waiting.append(job)
                n += 1
                if not first:
                    self.log(f"  new slide: {self.names.slide(p.name)}")
        return n

    def _register(self, p: Path) -> SlideJob | None:
        led, opts = self.ledger, self.opts
        case = self.cases.get(p.name, "")
        if p.is_dir():
            led.see_file(str(p), p.name, None, case,
                         error=f"{p}: {slide_store(p) or 'is a folder, not a slide file (pass the slide file itself)'}")
            return None
        if p.suffix.lower() not in SCAN_EXTENSIONS:
            if is_dicom_file(p):
                error = f"{p}: a DICOM file without the .dcm extension: rename it to {p.name}.dcm"
            else:
                error = (f"{p}: '{p.suffix}' is not a slide format wsi-apl reads (SVS, NDPI, MRXS, SCN, DICOM .dcm, "
                         "generic or pyramidal TIFF, JPEG/PNG/BMP camera frames); convert the slide to one of them, "
                         "e.g. OME-TIFF, or move the file out of the slide folder")
            led.see_file(str(p), p.name, None, case, error=error)
            return None
        if p.suffix.lower() in UNREADABLE_SLIDE_EXTENSIONS:
            cause, fix = REFUSED_FORMATS.get(p.suffix.lower(), (f"{p.suffix} slides are not supported",
                                                                "export the slide as OME-TIFF or SVS"))
            led.see_file(str(p), p.name, None, case, error=f"{p}: {cause} ({fix})")
            return None
        try:
            st = p.stat()
            fp = fingerprint(p)
        except OSError as exc:
            led.see_file(str(p), p.name, None, case, error=f"{p}: cannot read the file ({exc})")
            return None
        led.see_file(str(p), p.name, fp, case)
        if not opts.force and led.is_done(fp, self.bundle.id):
            self.skipped += 1
            return None
        if fp in self.jobs:
            self.jobs[fp].names.append(p)
            self.jobs[fp].case = self.jobs[fp].case or case
            return None
        return SlideJob(fp, p, [p], st.st_size, case=case, mtime_ns=st.st_mtime_ns)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        opts, bundle = self.opts, self.bundle
        handle = start_cluster(opts.scheduler, opts.workers, opts.torch_threads, tls=opts.tls, slurm=opts.slurm)
        self.n_workers = handle.workers
        self.log(f"Dask cluster: {handle.workers} worker(s){' with GPUs' if handle.gpus else ' (CPU)'}; "
                 f"dashboard {handle.dashboard}")
        self.run_id = uuid.uuid4().hex[:8]
        try:
            register_bundles(handle, {bundle.id: str(bundle.path.resolve())}, opts.torch_threads,
                             remote=bool(opts.scheduler or opts.slurm))
            self.window = window = TaskWindow(handle.client, opts.max_in_flight or max(4, 3 * handle.workers),
                                              gpu=handle.gpus > 0)
            self.max_active = opts.max_active_slides or max(2, 2 * handle.workers)
            if opts.deadline is not None and time.time() >= opts.deadline:
                self._close("the --deadline had passed before this slide was started")
            self._admit()
            self.t0 = time.time()
            last_poll = last_progress = time.time()
            cut_off_since = None
            for done in window.results(tick=1.0):
                now = time.time()
                if handle.client.status != "running":  # the scheduler is gone (a site's scheduler died)
                    cut_off_since = cut_off_since or now
                    if now - cut_off_since > opts.scheduler_lost_s:
                        raise ClusterError(f"the Dask scheduler ({opts.scheduler or 'embedded'}) has not answered "
                                           f"for {opts.scheduler_lost_s:.0f} s: the slides in hand are listed as "
                                           "not_analysed; start the scheduler again (or scan without --scheduler) "
                                           "and run the same scan command")
                else:
                    cut_off_since = None
                if self.stop_signal is not None and self.stop_by is None:
                    self._stop(now)
                if self.stop_by is not None and now > self.stop_by:
                    n = window.cancel(lambda tag: True)
                    self.log(f"  {n} task(s) still in hand after {opts.stop_grace_s:.0f} s: abandoned")
                    break
                if opts.deadline is not None and now >= opts.deadline and not self.closed:
                    self._close(f"the --deadline {time.strftime('%H:%M', time.localtime(opts.deadline))} was "
                                "reached before this slide was started")
                if done is not None:
                    last_progress = now
                    self._on_done(done)
                elif window.in_flight and now - last_progress > opts.stall_s:
                    self._stalled(now - last_progress)
                    last_progress = now
                if opts.watch and not self.closed and now - last_poll >= opts.poll_s:
                    last_poll = now
                    if self.discover():
                        self._admit()
                if not window.pending and not self.waiting and (self.closed or not opts.watch):
                    break
        finally:
            self.t_end = time.time()
            if self.window is not None:
                self.bytes_submitted = self.window.bytes_submitted
            handle.close()

    def _admit(self) -> None:
        window, bundle, opts = self.window, self.bundle, self.opts
        selector = {"max_areas": opts.max_areas, "target_cells": opts.target_cells}
        while self.waiting and self.active < self.max_active and not self.closed:
            job = self.waiting.popleft()
            self.ledger.start(job.fp, bundle.id, job.size)
            self.attempts[job.fp] = (self.ledger.slide(job.fp) or {}).get("attempts", 1)
            job.started = time.time()
            window.add(("select", job.fp),
                       f"select-{job.fp[:16]}-{bundle.id[:8]}-{self.run_id}-{self.attempts[job.fp]}",
                       select_task, str(job.path), bundle.area_size, bundle.mpp, selector, opts.reader, opts.mpp,
                       retries=opts.area_retries)
            self.active += 1

    def _on_done(self, done) -> None:
        window, bundle, opts = self.window, self.bundle, self.opts
        kind, fp = done.tag[0], done.tag[1]
        job = self.jobs[fp]
        if job.failed:
            return
        finished = False
        if not done.ok:
            job.failed = True
            window.cancel(lambda tag, fp=fp: tag[1] == fp)
            what = "choosing the areas" if kind == "select" else f"area {done.tag[2]}"
            finish_failed(job, f"{what}: {done.error}", self.ledger, bundle, opts, self.log, self.names)
            finished = True
        elif kind == "select":
            job.selection = sel = done.value
            self.stage_seconds["select"] += float(sel.timings.get("total", 0.0))
            job.expected = len(sel.areas) if sel.status == "ok" else 0
            for a in sel.areas if job.expected else []:
                window.add(("area", fp, a.index),
                           f"area-{fp[:16]}-{bundle.id[:8]}-{self.run_id}-{self.attempts[fp]}-{a.index}",
                           area_task, str(job.path), a.box, a.index, bundle.id, opts.reader, opts.mpp, a.size,
                           gpu_task=True, front=True, retries=opts.area_retries)
                self.area_tasks += 1
            finished = job.expected == 0
        else:
            job.tables.append(done.value)
            for k, v in _area_stages(done.value).items():
                self.stage_seconds[k] += v
            self.areas_done += 1
            self.cells_done += len(done.value)
            finished = len(job.tables) == job.expected
        if not finished:
            return
        job.finished = True
        if not job.failed and self._changed_while_read(job):
            return
        if not job.failed:
            try:
                t = time.perf_counter()
                finish(job, self.analysis, self.ledger, opts, self.log, self.alerts, self.names)
                self.stage_seconds["write"] += time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the batch
                job.failed = True
                finish_failed(job, f"could not finish the analysis ({type(exc).__name__}: {exc})", self.ledger,
                               bundle, opts, self.log, self.names)
        job.selection, job.tables = None, []
        self.active -= 1
        self.n_done += 1
        self._admit()
        self.checkpoint()
        el = max(1e-6, time.time() - self.t0)
        left = len(self.waiting) + self.active
        eta = left * el / self.n_done
        self.log(f"  [{self.n_done}/{self.n_done + left} slides] {self.areas_done / el:.2f} areas/s, "
                 f"{self.cells_done / el:.0f} cells/s, {3600 * self.n_done / el:.0f} slides/h"
                 + (f", ETA {eta / 60:.1f} min" if left else ""))

    def _changed_while_read(self, job: SlideJob) -> bool:
        """The file changed between its fingerprint and the end of its reads: its result would mix
        pixels of two versions. It is read again as a new version (at most twice), never reported."""
        try:
            st = job.path.stat()
            now = (st.st_size, st.st_mtime_ns)
        except OSError:
            now = None
        if now == (job.size, job.mtime_ns):
            return False
        self.ledger.set_not_analysed(job.fp, "the file changed while it was read; read again as a new version",
                                      self.bundle.id)
        job.selection, job.tables = None, []
        self.active -= 1
        n = self.changed[job.path] = self.changed.get(job.path, 0) + 1
        if now is None or n > 2:
            why = ("the file disappeared while it was read" if now is None else
                   "the file kept changing while it was read: wait until the scanner has finished writing it")
            self.ledger.see_file(str(job.path), job.path.name, None, job.case, error=f"{job.path}: {why}")
            self.log(f"  {self.names.slide(job.path.name)}: failed: {self.names.text(why, job.path)}")
            self.n_done += 1
        else:
            self.log(f"  {self.names.slide(job.path.name)}: the file changed while it was read: reading it again")
            self.folder.forget(job.path)
            self.discover()
        self._admit()
        self.checkpoint()
        return True

    def _stalled(self, idle_s: float) -> None:
        """No task finished for ``stall_s``: fail the slides in flight rather than wait all night."""
        why = (f"no worker finished a task for {idle_s / 60:.0f} min (workers gone, or GPU tasks on a cluster "
               "without GPU workers?)")
        for job in list(self.jobs.values()):
            if job.started and not job.finished:
                job.failed = job.finished = True
                self.window.cancel(lambda tag, fp=job.fp: tag[1] == fp)
                finish_failed(job, why, self.ledger, self.bundle, self.opts, self.log, self.names)
                self.active -= 1
                self.n_done += 1
        self._admit()
        self.checkpoint()

    def _close(self, reason: str) -> None:
        """The deadline: slides not started are recorded as not analysed; those in hand are finished."""
        if self.opts.watch:
            self.discover()  # slides that have settled since the last look are listed with the deadline's reason
        self.closed = True
        n = self._not_started(reason)
        self.log(f"Deadline reached: {n} slide(s) not started are listed as not_analysed; finishing "
                 f"{self.active} slide(s) in hand")
        self.checkpoint()

    def _not_started(self, reason: str) -> int:
        """Every waiting slide leaves the queue as not_analysed with ``reason``; returns how many."""
        n = len(self.waiting)
        while self.waiting:
            self.ledger.set_not_analysed(self.waiting.popleft().fp, reason, self.bundle.id)
        return n

    def _stop(self, now: float) -> None:
        """A stop signal (SIGTERM): start nothing more, let the tasks in hand finish, then end."""
        name = signal.Signals(self.stop_signal).name
        self.stop_by = now + self.opts.stop_grace_s
        self.closed = True
        dropped = self.window.stop()
        n = self._not_started(f"the scan was stopped ({name}) before this slide was started; scan again to "
                              "analyse it")
        self.log(f"{name}: stopping. {n} slide(s) not started and {dropped} queued area task(s) dropped; "
                 f"finishing the {self.window.in_flight} task(s) in hand, then writing the list")
        self.checkpoint("stopping", f"stopped by {name}")

    def close_unfinished(self) -> None:
        """At the end, whatever the cause: every slide seen but without a result says so."""
        self._not_started("not analysed before the scan ended; look at this slide yourself")
        for job in self.jobs.values():
            if job.started and not job.finished:
                self.ledger.set_not_analysed(job.fp, "the scan stopped before this slide was finished; scan again "
                                             "to analyse it", self.bundle.id)
        if self.opts.watch:
            try:
                late, _ = self.folder.poll()
            except OSError:
                late = []
            for p in late:
                self.ledger.see_file(str(p), p.name, None, self.cases.get(p.name, ""), status=Status.NOT_ANALYSED,
                                     error=f"{p}: appeared after the scan stopped starting slides")
            for p in self.folder.unready():
                self.ledger.see_file(str(p), p.name, None, self.cases.get(p.name, ""), status=Status.NOT_ANALYSED,
                                     error=f"{p}: the file was still being written when the scan ended")


AREA_STAGES = ("read", "detect", "classify", "measure")


def _area_stages(table) -> dict[str, float]:
    """Worker seconds per stage of one area's cell table."""
    return {k: float(v) for k, v in table.timings.items() if k in AREA_STAGES}


def _provenance(bundle, job: SlideJob) -> dict:
    import numpy
    import torch
    import zarr

    from . import __version__

    return {"bundle_id": bundle.id, "bundle": bundle.label, "wsi_apl": __version__, "torch": torch.__version__,
            "zarr": zarr.__version__, "numpy": numpy.__version__, "fingerprint": job.fp,
            "seconds": round(time.time() - job.started, 2)}


def finish(job: SlideJob, analysis: SlideAnalysis, ledger: Ledger, opts: ScanOptions, log, alerts: Alerts,
            names: Names) -> None:
    """The client's part of a slide: its outcome from the areas' tables, then store, alert, ledger."""
    sel = job.selection
    outcome = analysis.conclude(job.path, sel, job.tables, names=names, fingerprint=job.fp, case=job.case)
    result = outcome.result
    stages = collections.Counter()
    for t in job.tables:
        stages.update(_area_stages(t))
    result.timings = {"seconds": round(time.time() - job.started, 2),
                      "select": round(float(sel.timings.get("total", 0.0)), 3),
                      **{k: round(v, 3) for k, v in stages.items()}}
    group = group_name(job.path, job.fp, names)
    attrs = outcome.store_attrs(names, job.path, _provenance(analysis.bundle, job))
    write_slide_group(opts.out, group, outcome.cells, attrs)
    if result.status == Status.FLAGGED:  # alerted before the ledger says done: a crash in between repeats it
        alerts.flag(job.path, job.case, result.suspicion)
    ledger.finish(job.fp, result.status, result.to_json(), group)
    extra = f" (suspicion {result.suspicion:.2f})" if result.suspicion is not None else ""
    why = f": {result.reason}" if result.reason else ""
    log(f"  {result.slide}: {result.status}{extra}, {result.cells} cells in {result.areas} areas{why}")


def finish_failed(job: SlideJob, error: str, ledger: Ledger, bundle, opts: ScanOptions, log,
                   names: Names | None = None) -> None:
    names = names or Names()
    result = SlideResult(slide=names.slide(job.path.name), path=names.path(job.path), status=Status.FAILED,
                         reason=names.text(error, job.path), bundle=bundle.label,
                         scanned_at=time.strftime("%Y-%m-%d %H:%M:%S"), fingerprint=job.fp)
    remove_slide_group(opts.out, group_name(job.path, job.fp, names))  # an older result must not outlive this failure
    ledger.fail(job.fp, error, result.to_json())
    log(f"  {result.slide}: failed: {result.reason}")
