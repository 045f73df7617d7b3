"""Shared fixtures: real third-party files from ../shared/testdata and tiny synthetic cohorts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import wsi_apl  # noqa: F401 - first, so its numerical settings (MKL_CBWR) hold before any test computes

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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny bundle trained on 12 small synthetic slides (3 patients per diagnosis): (root, bundle)."""
    from wsi_apl.synth.cohort import parse_diagnoses, synth_cohort
    from wsi_apl.train.steps import Geometry, train_all

    root = tmp_path_factory.mktemp("e2e")
    cohort = root / "cohort"
    synth_cohort(cohort, parse_diagnoses("apl:3,aml:3,healthy:3,reactive:3"), seed=31, mpp=0.5, size=(3000, 2250))
    # 6 detector epochs: after 3 the tiny detector is still near chance (validation AP50 ~0.005) and a
    # slide may get no cell at all, which leaves too few patients for the slide-level nets (6: AP50 ~0.4)
    bundle = train_all(cohort, root / "bundle", geometry=Geometry(0.5, (256, 192)), detector_epochs=6,
                       cells_epochs=2, min_cells=20, max_areas=6, target_cells=0, cell_share=0.34,
                       log=lambda s: None)
    return root, bundle
