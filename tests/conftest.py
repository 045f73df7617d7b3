"""Shared fixtures: real third-party files from ../shared/testdata and tiny synthetic cohorts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_CANDIDATES = [os.environ.get("WSI_APL_TESTDATA"), ROOT.parent / "shared" / "testdata", "/work/shared/testdata"]
TESTDATA = next((Path(c) for c in _CANDIDATES if c and Path(c).is_dir()), ROOT.parent / "shared" / "testdata")


def testdata(*parts: str) -> Path:
    p = TESTDATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real test file missing: {p} (set WSI_APL_TESTDATA to the shared testdata folder)")
    return p


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory) -> Path:
    """Four small synthetic slides (one per diagnosis) at 0.25 µm/px, 4000x3000 px."""
    from wsi_apl.synth.cohort import synth_cohort

    out = tmp_path_factory.mktemp("cohort")
    synth_cohort(out, ["apl", "aml", "healthy", "reactive"], seed=3, mpp=0.25, size=(4000, 3000))
    return out


@pytest.fixture(scope="session")
def medium_slide(tmp_path_factory) -> Path:
    """One healthy-marrow slide large enough for several areas (8000x6000 px at 0.25 µm/px)."""
    from wsi_apl.synth.cohort import synth_cohort

    out = tmp_path_factory.mktemp("medium")
    synth_cohort(out, ["healthy"], seed=5, mpp=0.25, size=(8000, 6000))
    return out
