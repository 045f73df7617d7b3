"""The ``wsi-apl`` command line: one module per command group, joined here.

- :mod:`.data`: ``synth``, ``estimate-mpp``, ``info``, ``select``
- :mod:`.train`: ``train detector|cells|enn|all``, ``propose``
- :mod:`.evaluate`: ``evaluate detector|cells|enn``
- :mod:`.scan`: ``scan``, ``status``, ``triage``, ``demo``
- :mod:`.bundle`: ``bundle info|verify|import-keras``
- :mod:`.report`, :mod:`.export`, :mod:`.verify`: ``report``, ``export geojson|via``, ``pseudonyms``,
  ``verdict``, ``verify``

The modules hold click declarations only; the work's own modules (torch, zarr, dask, pandas) load
inside the commands, so ``wsi-apl --help`` stays quick.
"""

from __future__ import annotations

import click

from .. import __version__
from . import bundle, data, evaluate, export, report, scan, train, verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-apl")
def main() -> None:
    """Whole-slide batch scanner flagging suspected acute promyelocytic leukemia (APL) in bone-marrow smears.

    Decision support only: an expert must review every slide; not_flagged does not exclude APL.
    """


for command in (data.synth, data.estimate_mpp_cmd, data.info, data.select,
                train.train, train.propose,
                evaluate.evaluate,
                scan.scan, scan.status, scan.triage, scan.demo,
                bundle.bundle,
                report.report_cmd, export.export, export.pseudonyms, verify.verdict, verify.verify):
    main.add_command(command)
