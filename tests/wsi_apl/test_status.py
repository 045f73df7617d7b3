"""One enum of statuses, and a result that is current only for the bundle that made it."""

from __future__ import annotations

from wsi_apl.ledger import Ledger
from wsi_apl.status import RESULTS, TRIAGE_ORDER, Status
from wsi_apl.triage import triage_rows


def _finished(led: Ledger, fp: str, bundle_id: str, label: str, status: Status, suspicion: float) -> None:
    led.see_file(f"/slides/{fp}.svs", f"{fp}.svs", fp)
    led.start(fp, bundle_id, 10)
    led.finish(fp, status, {"status": status, "suspicion": suspicion, "bundle": label, "cells": 500}, None)


def test_the_enum_is_what_every_output_writes():
    assert [str(s) for s in Status] == ["flagged", "inconclusive", "failed", "not_analysed", "not_flagged"]
    assert set(TRIAGE_ORDER) == set(Status) and Status.FAILED not in RESULTS


def test_a_result_of_another_bundle_is_not_current(tmp_path):
    led = Ledger(tmp_path)
    try:
        led.set_bundle("A" * 16, "old@AAAA")
        _finished(led, "s1", "A" * 16, "old@AAAA", Status.NOT_FLAGGED, 0.12)
        _finished(led, "s2", "A" * 16, "old@AAAA", Status.FLAGGED, 0.93)
        _finished(led, "s3", "A" * 16, "old@AAAA", Status.NOT_FLAGGED, 0.05)
        assert {r["slide"]: r["status"] for r in triage_rows(led)} == {
            "s1.svs": "not_flagged", "s2.svs": "flagged", "s3.svs": "not_flagged"}
        # tonight's scan has another bundle: s1 reached the deadline unstarted, s2 was never reached
        # (the scan was killed), s3 was redone
        led.set_bundle("B" * 16, "new@BBBB")
        led.set_not_analysed("s1", "the --deadline was reached before this slide was started", "B" * 16)
        _finished(led, "s3", "B" * 16, "new@BBBB", Status.NOT_FLAGGED, 0.07)
        rows = {r["slide"]: r for r in triage_rows(led)}
        for name, was in (("s1.svs", "not_flagged"), ("s2.svs", "flagged")):
            assert rows[name]["status"] == "not_analysed"
            assert "another bundle (old@AAAA: " + was in rows[name]["reason"]
            assert "new@BBBB" in rows[name]["reason"] and rows[name]["suspicion"] is None
        assert rows["s3.svs"]["status"] == "not_flagged" and rows["s3.svs"]["bundle"] == "new@BBBB"
        # a result of this scan's own bundle stays what it was when the deadline comes
        led.set_not_analysed("s3", "deadline", "B" * 16)
        assert {r["slide"]: r["status"] for r in triage_rows(led)}["s3.svs"] == "not_flagged"
    finally:
        led.close()
