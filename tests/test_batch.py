"""The overnight batch on real parts: a killed worker, a killed CLI, the deadline, --on-flag, TLS, SLURM.

Every scan here goes through a real Dask cluster (an embedded LocalCluster, a LocalCluster reached
by address, or ``dask scheduler`` + ``dask worker`` over TLS) into a real SQLite ledger and zarr
store, and the results of a disturbed run are compared with an undisturbed one.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from distributed import WorkerPlugin

from wsi_apl.cli import main
from wsi_apl.store import read_slide_group, slide_groups

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-c", "import sys; from wsi_apl.cli import main; sys.exit(main())"]
SCAN_ARGS = ["--max-areas", "6", "--target-cells", "0"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Four small slides (one per diagnosis) whose files are old enough to count as finished."""
    from wsi_apl.synth.cohort import synth_cohort

    folder = tmp_path_factory.mktemp("night") / "slides"
    synth_cohort(folder, ["apl", "aml", "healthy", "reactive"], seed=41, mpp=0.5, size=(3000, 2250))
    for extra in ("labels.csv", "truth"):
        p = folder / extra
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    old = time.time() - 3600
    for p in folder.iterdir():
        os.utime(p, (old, old))
    return folder


@pytest.fixture(scope="module")
def reference(trained, slides, tmp_path_factory):
    """An undisturbed scan of ``slides`` (embedded LocalCluster, 2 workers)."""
    _, bundle = trained
    out = tmp_path_factory.mktemp("ref") / "results"
    r = CliRunner().invoke(main, ["scan", str(slides), "--out", str(out), "--bundle", str(bundle.path), "--allow-synthetic",
                                  "--workers", "2", *SCAN_ARGS])
    assert r.exit_code == 0, r.output
    return out


def test_scan_needs_a_bundle_and_refuses_a_synthetic_one_unless_asked(trained, slides, tmp_path, monkeypatch):
    """No silent demo models: without --bundle (or $WSI_APL_BUNDLE) the scan stops, and a bundle trained
    on synthetic data is refused without --allow-synthetic, before anything is written."""
    _, bundle = trained
    monkeypatch.delenv("WSI_APL_BUNDLE", raising=False)
    out = tmp_path / "results"
    r = CliRunner().invoke(main, ["scan", str(slides), "--out", str(out), *SCAN_ARGS])
    assert r.exit_code == 2 and "--bundle" in r.output
    r = CliRunner().invoke(main, ["scan", str(slides), "--out", str(out), "--bundle", str(bundle.path), *SCAN_ARGS])
    assert r.exit_code == 2, r.output
    assert "synthetic data" in r.output and "--allow-synthetic" in r.output
    assert not (out / "triage.csv").exists() and not (out / "ledger.sqlite").exists()


def _results(out: Path) -> dict[str, dict]:
    """slide name → status, counted cells and the per-cell probabilities of its zarr group."""
    res = {}
    for g in slide_groups(out):
        cols, attrs = read_slide_group(out, g)
        r = attrs["result"]
        res[r["slide"]] = {"status": r["status"], "cells": r["cells"], "n": len(cols["score"]),
                           "p": np.stack([cols[k] for k in sorted(cols) if k.startswith("p_")], axis=1)}
    return res


def _same_results(a: Path, b: Path) -> None:
    ra, rb = _results(a), _results(b)
    assert set(ra) == set(rb)
    for name in ra:
        assert ra[name]["status"] == rb[name]["status"], name
        assert ra[name]["cells"] == rb[name]["cells"] and ra[name]["n"] == rb[name]["n"], name
        np.testing.assert_allclose(ra[name]["p"], rb[name]["p"], atol=1e-6, err_msg=name)


def _ledger(out: Path) -> list[tuple]:
    """(fingerprint, status, attempts) of every slide, read while a scan may be writing (WAL)."""
    if not (out / "ledger.sqlite").exists():
        return []
    try:
        db = sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT fingerprint, status, attempts FROM slides").fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError:  # the scan has not created its tables yet
        return []


# -- a worker dies while it computes an area ---------------------------------------------------------


class KillOnce(WorkerPlugin):
    """Kills its own worker process (SIGKILL) the first time an area task starts executing there."""

    name = "test-kill-once"

    def __init__(self, flag: str):
        self.flag = flag

    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("area-") and not os.path.exists(self.flag):
            with open(self.flag, "w") as f:
                f.write(f"{key}\t{self.worker.address}\t{os.getpid()}")
            os.kill(os.getpid(), signal.SIGKILL)


class AppendOnce(WorkerPlugin):
    """Appends a few bytes to a slide file the first time an area task starts: the file changes while
    the scan reads it (a scanner rewriting it, a copy that resumed)."""

    name = "test-append-once"

    def __init__(self, flag: str, path: str):
        self.flag, self.path = flag, path

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith("area-") and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            with open(self.path, "ab") as f:
                f.write(b"\x00" * 16)  # past the last TIFF offset: still a valid slide, another file
            t = time.time() + 5
            os.utime(self.path, (t, t))


def test_a_file_that_changes_while_it_is_read_is_read_again(trained, slides, tmp_path):
    """Never a result from mixed pixels: the slide whose file changed after its fingerprint is not
    reported from that read; it is read again as the new version, under the new fingerprint."""
    from cluster.client import start_cluster
    from wsi_apl.ledger import fingerprint

    _, bundle = trained
    folder = tmp_path / "slides"
    shutil.copytree(slides, folder, copy_function=shutil.copy2)
    target = sorted(folder.iterdir())[0]
    old_fp = fingerprint(target)
    handle = start_cluster(n_workers=1, torch_threads=1)
    try:
        handle.client.register_plugin(AppendOnce(str(tmp_path / "appended"), str(target)))
        out = tmp_path / "results"
        tls = handle.tls_files(tmp_path / "tls")  # the embedded cluster talks TLS with temporary certificates
        r = CliRunner().invoke(main, ["scan", str(folder), "--out", str(out), "--bundle", str(bundle.path),
                                      "--allow-synthetic", "--scheduler", handle.client.scheduler.address,
                                      "--tls-ca-file", str(tls.ca_file), "--tls-cert", str(tls.cert),
                                      "--tls-key", str(tls.key), "--max-active-slides", "1", *SCAN_ARGS])
    finally:
        handle.close()
    assert (tmp_path / "appended").exists()
    assert r.exit_code == 0, r.output
    assert f"{target.name}: the file changed while it was read: reading it again" in r.output
    rows = {row["slide"]: row for row in csv.DictReader((out / "triage.csv").open())}
    assert set(rows) == {p.name for p in folder.iterdir()}
    new_fp = fingerprint(target)
    assert new_fp != old_fp and rows[target.name]["fingerprint"] == new_fp
    assert rows[target.name]["status"] in ("flagged", "not_flagged", "inconclusive")
    assert not any(g.endswith(old_fp[:8]) for g in slide_groups(out))  # nothing stored from the mixed read


def test_worker_killed_while_holding_an_area_task(trained, slides, reference, tmp_path):
    from cluster.client import start_cluster

    _, bundle = trained
    handle = start_cluster(n_workers=2, torch_threads=1)
    try:
        address = handle.client.scheduler.address
        pids_before = set(handle.client.run(os.getpid).values())
        flag = tmp_path / "killed.txt"
        handle.client.register_plugin(KillOnce(str(flag)))
        out = tmp_path / "results"
        tls = handle.tls_files(tmp_path / "tls")  # the embedded cluster talks TLS with temporary certificates
        r = subprocess.run(CLI + ["scan", str(slides), "--out", str(out), "--bundle", str(bundle.path), "--allow-synthetic",
                                  "--scheduler", address, "--tls-ca-file", str(tls.ca_file),
                                  "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), *SCAN_ARGS],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        key, worker, pid = flag.read_text().split("\t")
        assert key.startswith("area-") and int(pid) in pids_before  # the dead worker held an area task
        handle.client.wait_for_workers(2, timeout=60)
        assert int(pid) not in set(handle.client.run(os.getpid).values())  # it really died (and was replaced)
    finally:
        handle.close()
    _same_results(reference, out)


# -- the CLI dies (kill -9) with slides in flight ------------------------------------------------------


def test_sigkill_mid_batch_then_rerun(trained, slides, reference, tmp_path):
    _, bundle = trained
    out = tmp_path / "results"
    # the reference's workers (2, one torch thread each: the thread count changes the last digits)
    args = ["scan", str(slides), "--out", str(out), "--bundle", str(bundle.path), "--allow-synthetic", "--workers", "2",
            "--max-active-slides", "1", *SCAN_ARGS]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    finished: set[str] = set()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            rows = _ledger(out)
            done = {fp for fp, st, _ in rows if st in ("flagged", "not_flagged", "inconclusive")}
            running = [fp for fp, st, _ in rows if st == "running"]
            if done and running and len(_final_rows(out)) >= len(done):  # the list is rewritten after each slide
                finished = done
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the scan ended before the test could kill it"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its LocalCluster, as in a power cut
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert finished and running  # killed with one slide finished and another in flight
    after_kill = {fp: (st, n) for fp, st, n in _ledger(out)}
    # the morning list after a power cut: as current as the last finished slide, and marked not final
    assert {r["fingerprint"] for r in _final_rows(out)} == finished
    in_hand = [r for r in csv.DictReader((out / "triage.csv").open()) if r["fingerprint"] == running[0]]
    assert in_hand and in_hand[0]["status"] == "not_analysed" and "no result yet" in in_hand[0]["reason"]
    st = json.loads(CliRunner().invoke(main, ["status", str(out), "--json"]).output)
    assert st["scan"]["state"] == "interrupted" and st["final"] is False
    assert "NOT final" in CliRunner().invoke(main, ["status", str(out)]).output

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"{len(finished)} slide(s) already analysed with this bundle: skipped" in r.output
    rows = {fp: (st, n) for fp, st, n in _ledger(out)}
    for fp in finished:
        assert rows[fp] == after_kill[fp]  # not redone: same status, still one attempt
    assert rows[running[0]][1] == 2  # the interrupted slide was redone
    assert len(slide_groups(out)) == 4  # one group per slide, no duplicates
    triage = list(csv.DictReader((out / "triage.csv").open()))
    assert sorted(t["slide"] for t in triage) == sorted(p.name for p in slides.iterdir())
    st = json.loads(CliRunner().invoke(main, ["status", str(out), "--json"]).output)
    assert st["scan"]["state"] == "complete" and st["final"] is True
    _same_results(reference, out)


def test_sigterm_finishes_the_tasks_in_hand_writes_the_list_and_exits_non_zero(trained, slides, reference,
                                                                                 tmp_path):
    _, bundle = trained
    out = tmp_path / "results"
    args = ["scan", str(slides), "--out", str(out), "--bundle", str(bundle.path), "--allow-synthetic", "--workers", "2",
            "--max-active-slides", "1", *SCAN_ARGS]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(st == "running" for _, st, _ in _ledger(out)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the scan ended before the test could stop it"
        proc.send_signal(signal.SIGTERM)  # the CLI only, as `kill PID` or a service manager would
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM: stopping" in output and "Stopped by SIGTERM" in output
    rows = {r["slide"]: r for r in csv.DictReader((out / "triage.csv").open())}
    assert set(rows) == {p.name for p in slides.iterdir()}  # none lost
    assert {r["status"] for r in rows.values()} <= {"flagged", "not_flagged", "inconclusive", "not_analysed"}
    stopped = [r for r in rows.values() if r["status"] == "not_analysed"]
    assert stopped and all("stopped" in r["reason"] for r in stopped)  # never silently negative
    assert all(st != "running" for _, st, _ in _ledger(out))
    st = json.loads(CliRunner().invoke(main, ["status", str(out), "--json"]).output)
    assert st["scan"]["state"] == "interrupted" and "SIGTERM" in st["scan"]["why"] and st["final"] is False
    r = CliRunner().invoke(main, args)  # the next run finishes the batch, with the results of an undisturbed one
    assert r.exit_code == 0, r.output
    _same_results(reference, out)


def _final_rows(out: Path) -> list[dict]:
    """The rows of triage.csv with a result (none while the file does not exist yet)."""
    try:
        rows = list(csv.DictReader((out / "triage.csv").open()))
    except FileNotFoundError:
        return []
    return [r for r in rows if r["status"] in ("flagged", "not_flagged", "inconclusive")]


def test_every_entry_that_could_be_a_slide_gets_a_row(trained, tmp_path):
    """Unknown formats and folders that hold a slide are failed rows with the format named; side files
    and ordinary subfolders are not rows. No slide can be read here, so no cluster starts."""
    _, bundle = trained
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "scan.heic").write_bytes(b"\x00" * 64)
    (folder / "slide.ome.zarr").mkdir()
    (folder / "slide.ome.zarr" / "zarr.json").write_text("{}")
    (folder / "series").mkdir()
    (folder / "series" / "level0.dcm").write_bytes(b"\x00" * 132)
    (folder / "orphan").mkdir()
    (folder / "orphan" / "Slidedat.ini").write_text("[GENERAL]\n")
    dicom = bytearray(200)
    dicom[128:132] = b"DICM"
    (folder / "IM0001").write_bytes(bytes(dicom))
    (folder / "notes.txt").write_text("night shift")
    (folder / "README").write_text("not a slide")
    (folder / "truth").mkdir()
    (folder / "truth" / "x.json").write_text("{}")
    out = tmp_path / "results"
    r = CliRunner().invoke(main, ["scan", str(folder), "--out", str(out), "--bundle", str(bundle.path),
                                  "--allow-synthetic", *SCAN_ARGS])
    assert r.exit_code == 1, r.output
    rows = {row["slide"]: row for row in csv.DictReader((out / "triage.csv").open())}
    assert set(rows) == {"scan.heic", "slide.ome.zarr", "series", "orphan", "IM0001"}, r.output
    assert all(row["status"] == "failed" for row in rows.values())
    assert "'.heic' is not a slide format" in rows["scan.heic"]["reason"]
    assert "zarr" in rows["slide.ome.zarr"]["reason"] and "DICOM" in rows["series"]["reason"]
    assert "orphan.mrxs" in rows["orphan"]["reason"] and "rename it to IM0001.dcm" in rows["IM0001"]["reason"]
    assert "notes.txt" in r.output  # named in the summary


def test_triage_waits_for_a_running_scan(tmp_path):
    """`wsi-apl triage` does not write the list under a running scan's feet."""
    from wsi_apl.ledger import Ledger

    led = Ledger(tmp_path)
    led.lock()  # as a scan holds it
    try:
        r = CliRunner().invoke(main, ["triage", str(tmp_path)])
        assert r.exit_code == 1 and "a scan is running" in r.output
        assert not (tmp_path / "triage.csv").exists()
    finally:
        led.close()
    r = CliRunner().invoke(main, ["triage", str(tmp_path)])
    assert r.exit_code == 0 and (tmp_path / "triage.csv").exists()


# -- the deadline and files still being written ----------------------------------------------------------


def test_deadline_leaves_not_analysed_rows(trained, slides, tmp_path):
    _, bundle = trained
    folder = tmp_path / "slides"
    shutil.copytree(slides, folder, copy_function=shutil.copy2)  # copies keep their old mtimes
    growing = folder / "being_written.svs"
    growing.write_bytes(b"II*\x00" + b"\x00" * 100)
    stop = threading.Event()

    def scanner_writing():  # a scanner still writing: the size changes more often than --settle
        while not stop.wait(0.2):
            with growing.open("ab") as f:
                f.write(b"\x00" * 64)

    writer = threading.Thread(target=scanner_writing, daemon=True)
    writer.start()
    out = tmp_path / "results"
    try:
        r = CliRunner().invoke(main, ["scan", str(folder), "--out", str(out), "--bundle", str(bundle.path),
                                      "--allow-synthetic", "--workers", "1", "--max-active-slides", "1", "--watch",
                                      "--deadline", "+2s", "--settle", "1", "--poll", "0.5", *SCAN_ARGS])
    finally:
        stop.set()
        writer.join()
    assert r.exit_code == 1, r.output  # some slides were not analysed
    assert "Deadline reached" in r.output
    rows = {row["slide"]: row for row in csv.DictReader((out / "triage.csv").open())}
    assert set(rows) == {p.name for p in folder.iterdir()}  # every slide seen has a row
    assert rows["being_written.svs"]["status"] == "not_analysed"
    assert "still being written" in rows["being_written.svs"]["reason"]
    late = [row for name, row in rows.items() if name != "being_written.svs" and row["status"] == "not_analysed"]
    assert late and all("deadline" in row["reason"] for row in late)
    assert {row["status"] for row in rows.values()} <= {"flagged", "not_flagged", "inconclusive", "not_analysed"}
    st = json.loads(CliRunner().invoke(main, ["status", str(out), "--json"]).output)
    assert st["counts"]["not_analysed"] == len(late) + 1


def test_a_file_settles_by_our_own_observation_not_by_its_mtime(tmp_path):
    """An old mtime (a copy that kept it, a share with a skewed clock) does not make a file ready: it
    must stay unchanged for --settle seconds that we watched ourselves."""
    from wsi_apl.inbox import SlideFolder

    now = [100.0]
    f = tmp_path / "copied.svs"
    f.write_bytes(b"II*\x00" + b"\x00" * 100)
    os.utime(f, (time.time() - 86400, time.time() - 86400))  # yesterday's mtime, as cp -p leaves it
    folder = SlideFolder(tmp_path, settle_s=30.0, clock=lambda: now[0])
    assert folder.poll()[0] == []  # first seen now: not ready, however old its mtime
    now[0] += 20
    with f.open("ab") as h:  # still being copied
        h.write(b"\x00" * 10)
    os.utime(f, (time.time() - 86400, time.time() - 86400))
    assert folder.poll()[0] == []  # changed: the wait starts again
    now[0] += 29
    assert folder.poll()[0] == []
    now[0] += 2
    assert folder.poll()[0] == [f]  # 31 s unchanged under our eyes
    assert folder.poll()[0] == []  # returned once


def test_results_of_another_bundle_are_not_current(trained, reference, slides, tmp_path):
    """Tonight's scan runs another bundle and reaches its deadline before any slide: yesterday's
    results are not passed off as tonight's (not_analysed, naming the old result)."""
    _, bundle = trained
    out = tmp_path / "results"
    shutil.copytree(reference, out)
    other = _bundle_flagging_everything(bundle, tmp_path / "other_bundle")
    r = CliRunner().invoke(main, ["scan", str(slides), "--out", str(out), "--bundle", str(other), "--allow-synthetic",
                                  "--workers", "1", "--deadline", "+0s", *SCAN_ARGS])
    assert r.exit_code == 1, r.output
    before = {row["slide"]: row for row in csv.DictReader((reference / "triage.csv").open())}
    rows = {row["slide"]: row for row in csv.DictReader((out / "triage.csv").open())}
    assert set(rows) == set(before)
    for name, row in rows.items():
        assert row["status"] == "not_analysed", row
        assert f"another bundle ({before[name]['bundle']}: {before[name]['status']}" in row["reason"]
        assert row["suspicion"] == ""


def test_parse_deadline():
    from wsi_apl.inbox import parse_deadline

    now = dt.datetime(2026, 11, 27, 22, 0).timestamp()
    assert dt.datetime.fromtimestamp(parse_deadline("06:30", now)) == dt.datetime(2026, 11, 28, 6, 30)
    assert dt.datetime.fromtimestamp(parse_deadline("23:15", now)) == dt.datetime(2026, 11, 27, 23, 15)
    assert parse_deadline("+90s", now) == now + 90 and parse_deadline("+2h", now) == now + 7200
    assert parse_deadline(None) is None
    with pytest.raises(ValueError, match="HH:MM"):
        parse_deadline("25:00", now)


# -- --on-flag and cases -------------------------------------------------------------------------------


def _bundle_flagging_everything(bundle, dest: Path) -> Path:
    """A copy of ``bundle`` whose rule flags every slide with a counted cell (thresholds 0)."""
    shutil.copytree(bundle.path, dest)
    meta = json.loads((dest / "bundle.json").read_text())
    meta["parts"]["slide_nets"]["decision"].update(threshold=0.0, min_cells=1,
                                                   thresholds={"apl_vs_aml": 0.0, "apl_vs_healthy": 0.0})
    (dest / "bundle.json").write_text(json.dumps(meta))
    return dest


def test_on_flag_runs_once_per_flagged_slide_with_case_ids(trained, slides, tmp_path):
    _, bundle = trained
    flagging = _bundle_flagging_everything(bundle, tmp_path / "bundle")
    cases = tmp_path / "cases.csv"
    cases.write_text("slide,case\n" + "".join(f"{p.name},=CASE-{i}\n" for i, p in enumerate(sorted(slides.iterdir()))))
    record = tmp_path / "pager.txt"
    script = tmp_path / "pager.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write('\\t'.join(sys.argv[2:]) + '\\n')\n")
    out = tmp_path / "results"
    r = CliRunner().invoke(main, ["scan", str(slides), "--out", str(out), "--bundle", str(flagging), "--allow-synthetic",
                                  "--workers", "2", "--cases", str(cases),
                                  "--on-flag", f"{sys.executable} {script} {record}", *SCAN_ARGS])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((out / "triage.csv").open()))
    flagged = {row["path"]: row for row in rows if row["status"] == "flagged"}
    assert len(flagged) == 4
    calls = [line.split("\t") for line in record.read_text().splitlines()]
    assert len(calls) == len(flagged)  # once per flagged slide
    for path, case, score in calls:
        assert flagged[path]["case"] == "'" + case  # neutralised in the CSV, given as is to the command
        assert case.startswith("=CASE-")
        assert abs(float(score) - float(flagged[path]["suspicion"])) < 1e-3
    assert len([x for x in (out / "alerts.log").read_text().splitlines() if "\tFLAGGED\t" in x]) == 4
    for g in slide_groups(out):  # the store carries the case id too
        _, attrs = read_slide_group(out, g)
        assert attrs["case"].startswith("=CASE-") and attrs["result"]["case"] == attrs["case"]


# -- an existing scheduler over TLS ------------------------------------------------------------------------


def _tls_files(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsi-apl-test")])
    now = dt.datetime.now(dt.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scan_through_a_tls_scheduler(trained, slides, reference, tmp_path):
    pytest.importorskip("cryptography")
    _, bundle = trained
    cert, key = _tls_files(tmp_path)
    tls = ["--tls-ca-file", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    port = _free_port()
    dask = str(Path(sys.executable).parent / "dask")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sched = subprocess.Popen([dask, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard", *tls], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([dask, "worker", f"tls://127.0.0.1:{port}", "--nthreads", "1", "--nworkers", "1",
                               "--no-dashboard", *tls], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        one = tmp_path / "one"
        one.mkdir()
        src = sorted(slides.iterdir())[0]
        shutil.copy2(src, one / src.name)
        address = f"tls://127.0.0.1:{port}"
        runner = CliRunner()
        r = runner.invoke(main, ["scan", str(one), "--out", str(tmp_path / "plain"), "--bundle", str(bundle.path), "--allow-synthetic",
                                 "--scheduler", address, *SCAN_ARGS])
        assert r.exit_code == 2 and "--tls-ca-file" in r.output  # refused in words, nothing half-done
        out = tmp_path / "results"
        deadline = time.time() + 60
        while True:  # the scheduler and worker take a few seconds to start
            r = runner.invoke(main, ["scan", str(one), "--out", str(out), "--bundle", str(bundle.path), "--allow-synthetic",
                                     "--scheduler", address, *tls, *SCAN_ARGS])
            if r.exit_code != 2 or time.time() > deadline:
                break
            time.sleep(1)
        assert r.exit_code == 0, r.output
        assert "Dask cluster: 1 worker(s)" in r.output
        ref = _results(reference)[src.name]
        got = _results(out)[src.name]
        assert got["status"] == ref["status"] and got["n"] == ref["n"]
        np.testing.assert_allclose(got["p"], ref["p"], atol=1e-6)
    finally:
        for p in (worker, sched):
            p.terminate()
        for p in (worker, sched):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


# -- SLURM: the job script dask-jobqueue would submit ----------------------------------------------------------


def test_slurm_job_script_asks_for_gpus_and_threads():
    pytest.importorskip("dask_jobqueue")
    from cluster.client import SlurmOptions, loopback_dashboard, slurm_cluster

    cluster = slurm_cluster(SlurmOptions(queue="gpu", account="haem", jobs=3, gpus_per_job=2, cores=16,
                                         memory="64GB", walltime="06:00:00"), submit=False)
    try:
        script = cluster.job_script()
        dashboard = loopback_dashboard(cluster)
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script and "#SBATCH -A haem" in script and "#SBATCH -t 06:00:00" in script
    assert "#SBATCH --gres=gpu:2" in script
    assert "--nworkers 2" in script and "--resources GPU=2" in script  # one worker per GPU, 2 area slots
    assert "export OMP_NUM_THREADS=8" in script
    assert dashboard.startswith("http://127.0.0.1:")  # the dashboard is not on every interface


def test_each_worker_takes_its_own_gpu():
    from cluster.plugin import worker_device

    assert worker_device(0, n_gpus=0) == "cpu"
    assert [worker_device(i, n_gpus=2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_device("wsi-apl-1234-3", n_gpus=4) == "cuda:3"
    assert worker_device("tcp://10.0.0.5:4001", n_gpus=1) == "cuda:0"
