"""Real scans shared by the export, verification and privacy tests (one each per session: a scan costs a
cluster start and a few slides' worth of detection)."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import testdata

CMU_SVS = ("openslide-CMU-1-Small-Region", "CMU-1-Small-Region.svs")  # Aperio SVS with label and macro images


@dataclass
class Scanned:
    results: Path
    bundle: object
    slides: Path
    diagnosis: dict[str, str]  # file name -> diagnosis
    output: str


def _scan(root_bundle, tmp_path_factory, name: str, files: list[Path], *extra: str) -> Scanned:
    from wsi_apl.cli import main

    root, bundle = root_bundle
    with (root / "cohort" / "labels.csv").open() as f:
        dx = {r["path"]: r["diagnosis"] for r in csv.DictReader(f)}
    slides = tmp_path_factory.mktemp(f"{name}_slides")
    for p in files:
        shutil.copy(p, slides / p.name)
    out = tmp_path_factory.mktemp(f"{name}_results")
    r = CliRunner().invoke(main, ["scan", str(slides), "--out", str(out), "--bundle", str(bundle.path),
                                  "--allow-synthetic", "--workers", "2", "--max-areas", "4", "--target-cells", "0",
                                  *extra], catch_exceptions=False)
    assert r.exit_code in (0, 1), r.output  # 1: some slide failed (said in the list)
    return Scanned(out, bundle, slides, {p.name: dx.get(p.name, "") for p in files}, r.output)


def _cohort_slides(root: Path, diagnoses: list[str]) -> list[Path]:
    """The first cohort slide of each diagnosis in ``diagnoses``."""
    with (root / "cohort" / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [root / "cohort" / next(r["path"] for r in rows if r["diagnosis"] == d) for d in diagnoses]


@pytest.fixture(scope="session")
def scanned(trained, tmp_path_factory) -> Scanned:
    """An APL and a healthy slide of the training cohort, scanned with the tiny bundle (file names kept)."""
    root, _ = trained
    return _scan(trained, tmp_path_factory, "plain", _cohort_slides(root, ["apl", "healthy"]))


@pytest.fixture(scope="session")
def scanned_private(trained, tmp_path_factory) -> Scanned:
    """A real Aperio slide with label and macro images and an APL slide, scanned with --pseudonymize."""
    root, _ = trained
    return _scan(trained, tmp_path_factory, "private", [testdata(*CMU_SVS), *_cohort_slides(root, ["apl"])],
                 "--pseudonymize")
