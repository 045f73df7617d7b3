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

import collections
import datetime as dt
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cluster.client import ClusterError, SlurmOptions, TlsFiles, register_bundles, start_cluster
from cluster.plugin import area_task, select_task
from cluster.submit import TaskWindow
from tile_selector.slide import REFUSED_FORMATS
from workers.bundle import BundleError, load_bundle

from .alerts import Alerts
from .enn import SlideNets
from .inbox import SCAN_EXTENSIONS, UNREADABLE_SLIDE_EXTENSIONS, SlideFolder, is_dicom_file, read_cases, slide_store
from .ledger import Ledger, fingerprint
from .pipeline import SlideAnalysis, SlideResult, few_apl_slides
from .privacy import META_KEY, Names, create_key, read_key
from .status import DECISION_SUPPORT, Status
from .store import clean_staging, remove_slide_group, write_slide_group
from .triage import triage_rows, write_state, write_triage


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


@dataclass
class _SlideJob:
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
    batch = _Batch(opts, bundle, nets, ledger, cases, folder, log, names)
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
        out = write_triage(opts.out, ledger)
        exc = sys.exc_info()[1]
        stopped_by = signal.Signals(batch.stop_signal).name if batch.stop_signal else ""
        if stopped_by:
            state, why = "interrupted", f"stopped by {stopped_by}"
        elif ended_well:
            state, why = "complete", ""
        else:
            state, why = "interrupted", f"{type(exc).__name__}: {exc}" if exc is not None else "stopped"
        counts = batch.checkpoint(state, why, triage=False)
        ledger.close()
        if opts.report and opts.occlusion_cells > 0 and state == "complete":
            _update_report(opts, log, only=None, occlusion=True)  # every page once more, with occlusion maps
    elapsed = time.time() - t_start
    summary = {"counts": counts, "seconds": round(elapsed, 1), "triage": str(out),
               "store": str(opts.out / "cells.zarr"), "skipped": batch.skipped, "bundle": bundle.label,
               "areas": batch.areas_done, "cells": batch.cells_done, "workers": batch.n_workers,
               "bytes_to_workers": batch.bytes_submitted, "area_tasks": batch.area_tasks,
               "stage_seconds": {k: round(v, 3) for k, v in batch.stage_seconds.items()},
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


def _update_report(opts: ScanOptions, log: Callable[[str], None], only: list[str] | None, occlusion: bool) -> None:
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


def _catch_stop_signals(batch: "_Batch") -> Callable[[], None]:
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


class _Batch:
    """One scan's slides in flight: discovery, admission, results, deadline."""

    def __init__(self, opts: ScanOptions, bundle, nets, ledger: Ledger, cases: dict[str, str], folder: SlideFolder,
                 log: Callable[[str], None], names: Names | None = None):
        self.opts, self.bundle, self.ledger, self.cases = opts, bundle, ledger, cases
        # the client's part of the method; the workers run the selection and the areas (cluster.plugin)
        self.analysis = SlideAnalysis(bundle, nets, reader=opts.reader, slide_mpp=opts.mpp)
        self.folder, self.log = folder, log
        self.names = names or Names()
        self.alerts = Alerts(opts.out, opts.on_flag, log, names=self.names)
        self.jobs: dict[str, _SlideJob] = {}
        self.waiting: collections.deque[_SlideJob] = collections.deque()
        self.skipped = 0
        self.active = 0
        self.n_done = self.areas_done = self.cells_done = 0
        self.n_workers = 0
        self.bytes_submitted = 0
        self.area_tasks = 0
        self.stage_seconds: dict[str, float] = collections.defaultdict(float)
        self.closed = False  # the deadline passed: no new slide is started
        self.stop_signal: int | None = None  # SIGTERM received: finish the tasks in hand, write the list, stop
        self.stop_by: float | None = None
        self.attempts: dict[str, int] = {}
        self.changed: dict[Path, int] = {}  # files that changed while they were read, and how often
        self.window: TaskWindow | None = None
        self.started_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")

    # -- the list, current after every slide --------------------------------------------------------
    def checkpoint(self, state: str = "running", why: str = "", triage: bool = True) -> dict[str, int]:
        """Rewrite triage.csv and scan_state.json from the ledger (after every finished slide, so a
        killed scan leaves a list as current as its last slide); returns the counts per status."""
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
            _update_report(self.opts, self.log, only=[], occlusion=False)  # the pages of what changed
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

    def _register(self, p: Path) -> _SlideJob | None:
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
        return _SlideJob(fp, p, [p], st.st_size, case=case, mtime_ns=st.st_mtime_ns)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        opts, bundle = self.opts, self.bundle
        handle = start_cluster(opts.scheduler, opts.workers, tls=opts.tls, slurm=opts.slurm)
        self.n_workers = handle.workers
        self.log(f"Dask cluster: {handle.workers} worker(s){' with GPUs' if handle.gpus else ' (CPU)'}; "
                 f"dashboard {handle.dashboard}")
        self.run_id = uuid.uuid4().hex[:8]
        try:
            register_bundles(handle, {bundle.id: str(bundle.path.resolve())},
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
            _finish_failed(job, f"{what}: {done.error}", self.ledger, bundle, opts, self.log, self.names)
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
                _finish(job, self.analysis, self.ledger, opts, self.log, self.alerts, self.names)
                self.stage_seconds["write"] += time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the batch
                job.failed = True
                _finish_failed(job, f"could not finish the analysis ({type(exc).__name__}: {exc})", self.ledger,
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

    def _changed_while_read(self, job: _SlideJob) -> bool:
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
                _finish_failed(job, why, self.ledger, self.bundle, self.opts, self.log, self.names)
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


def _provenance(bundle, job: _SlideJob) -> dict:
    import numpy
    import torch
    import zarr

    from . import __version__

    return {"bundle_id": bundle.id, "bundle": bundle.label, "wsi_apl": __version__, "torch": torch.__version__,
            "zarr": zarr.__version__, "numpy": numpy.__version__, "fingerprint": job.fp,
            "seconds": round(time.time() - job.started, 2)}


def _finish(job: _SlideJob, analysis: SlideAnalysis, ledger: Ledger, opts: ScanOptions, log, alerts: Alerts,
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
    write_slide_group(opts.out, group_name(job.path, job.fp, names), outcome.cells,
                      outcome.store_attrs(names, job.path, _provenance(analysis.bundle, job)))
    if result.status == Status.FLAGGED:
        alerts.flag(job.path, job.case, result.suspicion)  # before the ledger says done: a crash in between repeats, never loses it
    ledger.finish(job.fp, result.status, result.to_json(), group_name(job.path, job.fp, names))
    extra = f" (suspicion {result.suspicion:.2f})" if result.suspicion is not None else ""
    why = f": {result.reason}" if result.reason else ""
    log(f"  {result.slide}: {result.status}{extra}, {result.cells} cells in {result.areas} areas{why}")


def _finish_failed(job: _SlideJob, error: str, ledger: Ledger, bundle, opts: ScanOptions, log,
                   names: Names | None = None) -> None:
    names = names or Names()
    result = SlideResult(slide=names.slide(job.path.name), path=names.path(job.path), status=Status.FAILED,
                         reason=names.text(error, job.path), bundle=bundle.label,
                         scanned_at=time.strftime("%Y-%m-%d %H:%M:%S"), fingerprint=job.fp)
    remove_slide_group(opts.out, group_name(job.path, job.fp, names))  # an older result must not outlive this failure
    ledger.fail(job.fp, error, result.to_json())
    log(f"  {result.slide}: failed: {result.reason}")
