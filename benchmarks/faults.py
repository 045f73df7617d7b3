"""The fault suite with counts: what an overnight batch survives, and whether any slide was lost,
listed twice, or reported negative without a result behind it.

    python benchmarks/faults.py --bundle demo_out/bundle                 # every scenario, 200-slide soak
    python benchmarks/faults.py --bundle demo_out/bundle --only soak --soak 40 --soak-faults 6

Scenarios (each on its own results folder, through the real CLI in a child process; a scenario ends
with plain reruns until the scan says its list is final, then the folder is audited):

- ``fuzz``: the hypothesis properties of the slide readers and the VIA, VOC, labels.csv, cases.csv,
  cell-CSV and paper-layout parsers (tests/wsi_apl/test_fuzz.py, ``--fuzz-scale`` times the examples);
- ``sigterm``: SIGTERM to the CLI mid-batch (finish the tasks in hand, write the list, exit 143);
- ``kill_cli``: kill -9 of the CLI and its LocalCluster mid-batch (a power cut);
- ``kill_worker``: kill -9 of one worker process mid-batch;
- ``scheduler_loss``: a site scheduler (``dask scheduler`` + ``dask worker``) killed mid-batch;
- ``disk_full``: the results folder on a 3 MB tmpfs (needs root; skipped otherwise), then grown;
- ``two_scans``: a second scan on the same results folder while the first runs (refused);
- ``tampered_bundle``: one byte of the detector's weights changed (refused before any slide);
- ``wrong_tls``: a tls:// scheduler with certificates it does not trust (refused, nothing written);
- ``soak``: N small slides (copies of 8 synthetic ones with distinct bytes, a tenth of them
  truncated), scanned with a random fault every 5-30 s (kill -9 of the CLI or of a worker,
  SIGTERM, a slide truncated or appended to while the scan runs), the scan started again whenever a
  fault ended it, until the list is final.

The audit of a folder counts, against the slide files in the input folder:
``lost`` (a slide file without exactly one row in triage.csv, or without a final status),
``duplicated`` (a path listed twice, or a slide version with two groups in cells.zarr), and
``silently_negative`` (a ``not_flagged`` row whose file is a damaged one, whose result is not of the
scan's bundle, or that has no cell group behind it). Each must be 0.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "import sys; from wsi_apl.cli import main; sys.exit(main())"]
FINAL = ("flagged", "not_flagged", "inconclusive", "failed", "not_analysed")


# -- helpers ---------------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def scan_args(slides: Path, out: Path, bundle: Path, *extra: str, workers: int | None = 2) -> list[str]:
    """The scan command line; ``workers=None`` for a scan that joins a scheduler (no local workers)."""
    local = ["--workers", str(workers)] if workers else []
    return [*CLI, "scan", str(slides), "--out", str(out), "--bundle", str(bundle), "--allow-synthetic",
            *local, "--max-areas", "4", "--target-cells", "0", *extra]


def run(args: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT,
                            start_new_session=True)


def ledger_states(out: Path) -> list[tuple[str, str]]:
    """(fingerprint, status) of every slide version, read while a scan may be writing (WAL)."""
    if not (out / "ledger.sqlite").exists():
        return []
    try:
        db = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT fingerprint, status FROM slides").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []


def wait_running(out: Path, proc: subprocess.Popen, timeout: float = 300, done_first: bool = False) -> bool:
    """Until a slide is in hand (and, with ``done_first``, another one finished)."""
    t_end = time.time() + timeout
    while time.time() < t_end and proc.poll() is None:
        states = [s for _, s in ledger_states(out)]
        if "running" in states and (not done_first or any(s in FINAL[:3] for s in states)):
            return True
        time.sleep(0.05)
    return False


def children(pid: int) -> list[int]:
    """Every process below ``pid`` (the LocalCluster's nannies and workers)."""
    out = []
    try:
        kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    except OSError:
        return out
    for k in kids:
        out.append(int(k))
        out += children(int(k))
    return out


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass


def finish(slides: Path, out: Path, bundle: Path, tries: int = 4) -> int:
    """Plain reruns until the list is final; returns the number of reruns."""
    for i in range(1, tries + 1):
        r = run(scan_args(slides, out, bundle))
        state = _state(out)
        if state.get("state") == "complete":
            return i
        print(f"    rerun {i}: exit {r.returncode}, state {state.get('state')}: {r.stderr.strip()[-300:]}")
    return tries


def _state(out: Path) -> dict:
    """The scan state as ``wsi-apl status`` reads it (a killed scan's ``running`` is ``interrupted``)."""
    from wsi_apl.triage import read_state

    return read_state(out) or {}


def audit(slides: Path, out: Path, damaged: set[str], bundle_label: str | None = None) -> dict:
    """Counts of lost, duplicated and silently negative slides (see the module's doc)."""
    from wsi_apl.inbox import list_slides
    from wsi_apl.store import slide_groups

    entries, _ = list_slides(slides)
    rows = list(csv.DictReader((out / "triage.csv").open())) if (out / "triage.csv").exists() else []
    by_path = collections.Counter(r["path"] for r in rows)
    lost = [p for p in entries if by_path.get(str(p), 0) == 0]
    lost += [r["path"] for r in rows if r["status"] not in FINAL]
    duplicated = [p for p, n in by_path.items() if n > 1]
    groups = collections.Counter(g.rsplit("-", 1)[-1] for g in slide_groups(out))
    duplicated += [fp for fp, n in groups.items() if n > 1]
    negative = []
    for r in rows:
        if r["status"] != "not_flagged":
            continue
        if Path(r["path"]).name in damaged or groups.get(r["fingerprint"][:8], 0) == 0:
            negative.append(r["path"])
        elif bundle_label and r["bundle"] != bundle_label:
            negative.append(r["path"])
    counts = collections.Counter(r["status"] for r in rows)
    return {"slides": len(entries), "rows": len(rows), "lost": len(lost), "duplicated": len(duplicated),
            "silently_negative": len(negative), "statuses": dict(counts), "final": _state(out).get("state")}


def make_slides(folder: Path, n: int, seed: int, damaged_share: float = 0.0) -> tuple[Path, set[str]]:
    """``n`` tiny slides: copies of 8 synthetic smears with distinct trailing bytes (so distinct
    fingerprints; TIFF readers ignore bytes after the last IFD), some truncated (damaged)."""
    base = Path(tempfile.gettempdir()) / "wsi-apl-faults-base-8000x6000"
    if not any(base.glob("*.tiff")):  # 2 x 1.5 mm smears: room for a few areas, so most get a result
        from wsi_apl.synth.cohort import DIAGNOSES, synth_cohort

        synth_cohort(base, [DIAGNOSES[i % len(DIAGNOSES)] for i in range(8)], seed=5, mpp=0.25,
                     size=(8000, 6000), log=lambda _m: None)
    sources = sorted(base.glob("*.tiff"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    damaged = set()
    for i in range(n):
        src = sources[i % len(sources)]
        dst = folder / f"s{i:04d}_{src.name}"
        shutil.copyfile(src, dst)
        with dst.open("ab") as f:
            f.write(f"wsi-apl-fault-suite {i}".encode())
        if rng.random() < damaged_share:
            size = dst.stat().st_size
            with dst.open("r+b") as f:
                f.truncate(int(size * rng.uniform(0.05, 0.6)))
            damaged.add(dst.name)
    old = time.time() - 3600
    for p in folder.iterdir():
        os.utime(p, (old, old))
    return folder, damaged


# -- scenarios -------------------------------------------------------------------------------------


def sc_fuzz(scale: int) -> dict:
    env = _env()
    env["WSI_APL_FUZZ_SCALE"] = str(scale)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/wsi_apl/test_fuzz.py"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    return {"ok": r.returncode == 0, "pytest": tail}


def sc_interrupt(work: Path, bundle: Path, how: str) -> dict:
    slides, damaged = make_slides(work / "slides", 6, seed=5)
    out = work / "results"
    proc = start(scan_args(slides, out, bundle, "--max-active-slides", "1"))
    try:
        in_hand = wait_running(out, proc, done_first=True)
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
            proc.wait(400)
        elif how == "kill_cli":
            kill_group(proc)
        elif how == "kill_worker":
            kids = [k for k in children(proc.pid)]
            if kids:
                os.kill(kids[-1], signal.SIGKILL)  # the deepest child: a worker process
            proc.wait(900)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    rc = proc.returncode
    after = audit(slides, out, damaged)
    reruns = finish(slides, out, bundle)
    res = audit(slides, out, damaged)
    return {**res, "fault_hit_a_slide_in_hand": in_hand, "exit": rc, "after_fault": after, "reruns": reruns}


def sc_scheduler_loss(work: Path, bundle: Path) -> dict:
    import socket

    slides, damaged = make_slides(work / "slides", 6, seed=5)
    out = work / "results"
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    addr = f"tcp://127.0.0.1:{port}"
    env = _env()
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                              "--port", str(port), "--dashboard-address", ":0"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1",
                               "--nworkers", "1", "--resources", "GPU=0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True)
    proc = None
    try:
        time.sleep(5)
        args = scan_args(slides, out, bundle, "--scheduler", addr, "--max-active-slides", "1", workers=None)
        t0 = time.time()
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
        in_hand = wait_running(out, proc)
        kill_group(sched)
        try:
            proc.communicate(timeout=900)
            rc, ended = proc.returncode, round(time.time() - t0, 1)
        except subprocess.TimeoutExpired:
            rc, ended = None, None
            kill_group(proc)
    finally:
        for p in (sched, worker, proc):
            if p is not None and p.poll() is None:
                kill_group(p)
    after = audit(slides, out, damaged)
    reruns = finish(slides, out, bundle)
    return {**audit(slides, out, damaged), "fault_hit_a_slide_in_hand": in_hand, "exit": rc,
            "cli_ended_after_s": ended, "after_fault": after, "reruns": reruns}


def sc_disk_full(work: Path, bundle: Path) -> dict:
    slides, damaged = make_slides(work / "slides", 4, seed=5)
    out = work / "results"
    out.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(out)], capture_output=True, text=True)
    if r.returncode:
        return {"skipped": f"cannot mount a small tmpfs ({r.stderr.strip() or 'needs root'})"}
    try:
        first = run(scan_args(slides, out, bundle))
        after = audit(slides, out, damaged)
        subprocess.run(["mount", "-o", "remount,size=512m", str(out)], check=True)
        reruns = finish(slides, out, bundle)
        res = audit(slides, out, damaged)
    finally:
        keep = work / "results_copy"
        shutil.copytree(out, keep, dirs_exist_ok=True)
        subprocess.run(["umount", str(out)], capture_output=True)
    return {**res, "exit_when_full": first.returncode, "after_fault": after, "reruns": reruns}


def sc_two_scans(work: Path, bundle: Path) -> dict:
    slides, damaged = make_slides(work / "slides", 8, seed=5)
    out = work / "results"
    proc = start(scan_args(slides, out, bundle, "--max-active-slides", "1"))
    try:
        wait_running(out, proc)
        second = run(scan_args(slides, out, bundle), timeout=600)
        proc.wait(900)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    reruns = finish(slides, out, bundle)
    return {**audit(slides, out, damaged), "second_exit": second.returncode,
            "second_refused": second.returncode == 2 and "another 'wsi-apl scan'" in second.stderr,
            "first_exit": proc.returncode, "reruns": reruns}


def sc_tampered_bundle(work: Path, bundle: Path) -> dict:
    slides, _ = make_slides(work / "slides", 2, seed=5)
    bad = work / "bundle"
    shutil.copytree(bundle, bad)
    w = bad / "detector.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    out = work / "results"
    r = run(scan_args(slides, out, bad))
    return {"exit": r.returncode, "refused": r.returncode == 2, "message": r.stderr.strip()[-200:],
            "nothing_written": not (out / "triage.csv").exists()}


def sc_wrong_tls(work: Path, bundle: Path) -> dict:
    from distributed import LocalCluster
    from distributed.security import Security

    slides, _ = make_slides(work / "slides", 2, seed=5)
    out = work / "results"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, protocol="tls://",
                      security=Security.temporary(), host="127.0.0.1", dashboard_address=None) as cluster:
        other = Security.temporary()  # certificates of another cluster: not trusted by this one
        files = {}
        for name, text in (("ca", other.tls_ca_file), ("cert", other.tls_client_cert), ("key", other.tls_client_key)):
            p = work / f"{name}.pem"
            p.write_text(text)
            files[name] = p
        args = scan_args(slides, out, bundle, "--scheduler", cluster.scheduler_address, "--tls-ca-file",
                         str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
                         workers=None)
        r = run(args, timeout=300)
    return {"exit": r.returncode, "refused": r.returncode != 0, "message": r.stderr.strip()[-200:],
            "no_result": not any(s in FINAL[:3] for _, s in ledger_states(out))}


def sc_soak(work: Path, bundle: Path, n: int, seed: int, max_faults: int) -> dict:
    """Scans of ``n`` slides with a random fault every 5-30 s (``max_faults`` in all), started again
    whenever a fault ended the scan, then left to finish."""
    slides, damaged = make_slides(work / "slides", n, seed=seed, damaged_share=0.1)
    out = work / "results"
    rng = random.Random(seed)
    faults = collections.Counter()
    runs = 0
    while _state(out).get("state") != "complete" and runs < max_faults + 5:
        runs += 1
        proc = start(scan_args(slides, out, bundle, "--max-active-slides", "2"))
        try:
            while proc.poll() is None:
                if sum(faults.values()) >= max_faults:
                    proc.wait(3600)  # enough faults: let this run finish the batch
                    break
                try:
                    proc.wait(rng.uniform(5, 30))
                    break  # the scan ended on its own
                except subprocess.TimeoutExpired:
                    pass
                fault = rng.choice(["kill_cli", "kill_worker", "sigterm", "change_file"])
                faults[fault] += 1
                if fault == "kill_cli":
                    kill_group(proc)
                elif fault == "sigterm":
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(600)
                elif fault == "kill_worker":
                    kids = children(proc.pid)
                    if kids:
                        os.kill(rng.choice(kids), signal.SIGKILL)
                else:  # a slide truncated (damaged) or appended to (a new version) while the scan runs
                    victim = rng.choice(sorted(p for p in slides.iterdir() if p.suffix == ".tiff"))
                    if rng.random() < 0.5:
                        with victim.open("r+b") as f:
                            f.truncate(victim.stat().st_size // 3)
                        damaged.add(victim.name)
                    else:
                        with victim.open("ab") as f:
                            f.write(b"another version")
                print(f"    soak run {runs}: {fault}", flush=True)
        finally:
            if proc.poll() is None:
                kill_group(proc)
        print(f"    soak run {runs} ended (exit {proc.returncode}): {audit(slides, out, damaged)['statuses']}",
              flush=True)
    res = audit(slides, out, damaged)
    res["damaged"] = len(damaged)
    res["damaged_not_failed"] = sum(1 for r in csv.DictReader((out / "triage.csv").open())
                                    if Path(r["path"]).name in damaged and r["status"] != "failed")
    return {**res, "runs": runs, "faults": dict(faults)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "demo_out" / "bundle")
    ap.add_argument("--soak", type=int, default=200, help="slides in the soak (0: no soak)")
    ap.add_argument("--soak-faults", type=int, default=20, help="faults injected into the soak's scans")
    ap.add_argument("--fuzz-scale", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    bundle = args.bundle.resolve()
    scenarios = {
        "fuzz": lambda w: sc_fuzz(args.fuzz_scale),
        "sigterm": lambda w: sc_interrupt(w, bundle, "sigterm"),
        "kill_cli": lambda w: sc_interrupt(w, bundle, "kill_cli"),
        "kill_worker": lambda w: sc_interrupt(w, bundle, "kill_worker"),
        "scheduler_loss": lambda w: sc_scheduler_loss(w, bundle),
        "disk_full": lambda w: sc_disk_full(w, bundle),
        "two_scans": lambda w: sc_two_scans(w, bundle),
        "tampered_bundle": lambda w: sc_tampered_bundle(w, bundle),
        "wrong_tls": lambda w: sc_wrong_tls(w, bundle),
        "soak": lambda w: sc_soak(w, bundle, args.soak, args.seed, args.soak_faults),
    }
    if not args.soak:
        scenarios.pop("soak")
    chosen = [s for s in args.only.split(",") if s] or list(scenarios)
    results = {}
    for name in chosen:
        work = Path(tempfile.mkdtemp(prefix=f"wsi-apl-faults-{name}-"))
        t0 = time.time()
        print(f"[{name}] …", flush=True)
        try:
            res = scenarios[name](work)
        except Exception as exc:  # a scenario that breaks is a finding, reported with the others
            res = {"error": f"{type(exc).__name__}: {exc}"}
        res["seconds"] = round(time.time() - t0, 1)
        results[name] = res
        print(f"[{name}] {json.dumps(res, default=str)}", flush=True)
    total = {k: sum(int(r.get(k, 0) or 0) for r in results.values()) for k in ("lost", "duplicated",
                                                                                 "silently_negative")}
    print("")
    print(f"{'scenario':<16} {'slides':>6} {'lost':>5} {'dup':>4} {'neg':>4}  final / outcome")
    for name, r in results.items():
        outcome = r.get("final") or r.get("pytest") or r.get("skipped") or r.get("error") or (
            "refused" if r.get("refused") or r.get("second_refused") else json.dumps(r)[:60])
        print(f"{name:<16} {r.get('slides', ''):>6} {r.get('lost', ''):>5} {r.get('duplicated', ''):>4} "
              f"{r.get('silently_negative', ''):>4}  {outcome}")
    print(f"TOTAL: slides lost {total['lost']}, duplicated {total['duplicated']}, "
          f"silently negative {total['silently_negative']} (each must be 0)")
    if args.json:
        args.json.write_text(json.dumps({"scenarios": results, "total": total}, indent=2, default=str))
    sys.exit(1 if any(total.values()) else 0)


if __name__ == "__main__":
    main()
