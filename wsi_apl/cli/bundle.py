"""Model bundles: ``bundle info|verify|import-keras``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .common import echo_err, fail, parse_area

# -- bundle ------------------------------------------------------------------------------------------


@click.group()
def bundle() -> None:
    """Inspect and verify model bundles."""


def _read_bundle(bundle_dir: Path):
    """bundle.json of ``bundle_dir`` (weights not hashed here), or exit 2 with the reason."""
    from workers.bundle import BundleError, load_bundle

    try:
        return load_bundle(bundle_dir, verify=False)
    except BundleError as exc:
        fail(str(exc))


@bundle.command("info")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def bundle_info(bundle_dir: Path, as_json: bool) -> None:
    """What a bundle holds: geometry, parts, metrics, provenance."""
    b = _read_bundle(bundle_dir)
    s = b.summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"{b.label}")
    res = f"{b.mpp} µm/px" if b.mpp_known else "the pictures' own pixels (no pixel size)"
    click.echo(f"  works at {res} on areas of {b.area_size[0]}x{b.area_size[1]} px; heads {', '.join(b.heads)}")
    for name, p in s["parts"].items():
        click.echo(f"  {name}: {p['file']} sha256 {p['sha256'][:16]}…  trained {p['trained']}")
        if p.get("metrics"):
            click.echo(f"    metrics: {json.dumps(p['metrics'], default=float)[:300]}")


@bundle.command("verify")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def bundle_verify(bundle_dir: Path) -> None:
    """Check every weight file against the sha256 in bundle.json."""
    b = _read_bundle(bundle_dir)
    problems = b.verify()
    if problems:
        for p in problems:
            echo_err(f"{bundle_dir}: {p}")
        sys.exit(1)
    click.echo(f"{bundle_dir}: OK ({len(b.meta.get('parts', {}))} parts verified; id {b.id})")


@bundle.command("import-keras")
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--head", required=True, help="The finding this binary network detects (e.g. promyelocyte).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Bundle directory: created, or the network is added to its cells part as one more head.")
@click.option("--trust", is_flag=True,
              help="Load the file although Keras model files can run code when loaded (legacy .h5 ignores safe "
                   "mode); only for files from a source you trust.")
@click.option("--mpp", type=float, default=None,
              help="Working resolution (µm/px) of a new bundle: the pixel size of the images the network was "
                   "trained on [default: 0.0668, the paper's frames]; an existing bundle keeps its own.")
@click.option("--area", default="2560x1920", show_default=True, help="Area size in pixels of a new bundle.")
@click.option("--positive-class", type=click.IntRange(0, 1), default=1, show_default=True,
              help="Dense(2, softmax) outputs: the index of the finding's class.")
def bundle_import_keras(model_file: Path, head: str, out: Path, trust: bool, mpp, area, positive_class) -> None:
    """Import a Keras Xception cell classifier (.keras or .h5) as one head of a bundle, for workers without TensorFlow.

    One binary network per finding, as in the paper: import each into the same --out. The weights are
    copied into the torch Xception and checked against Keras on random images before anything is written.
    Needs TensorFlow here only: pip install 'wsi-apl[keras]'.
    """
    from workers.bundle import BundleError

    from ..keras_import import KerasImportError, import_keras

    try:
        r = import_keras(model_file, head, out, trust, log=click.echo, mpp=mpp, area=parse_area(area),
                         positive_class=positive_class)
    except (KerasImportError, BundleError) as exc:
        fail(" ".join(str(exc).split()))
    c = r["check"]
    click.echo(f"{out}: {head} imported (max |Δp| {c['max_abs_diff_prob']:.1e} <= {c['tolerance_prob']:g}); "
               f"heads {', '.join(r['heads'])}")
