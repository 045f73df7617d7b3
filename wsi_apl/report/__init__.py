"""The static expert-review report of a scan results folder (``RESULTS/report/``).

``write_report(results, only=None, log=print)`` writes ``index.html`` (the triage list with status
chips, numbers and confidence-interval bars), one page per slide (overview, areas with outlined
cells, galleries, occlusion maps, ratios against the bundle's thresholds, morphometrics, a verdict
form) and the pictures they show. It works offline from ``file://``: inline style and script, no
server. Decision support only.

The heavy modules (zarr, PIL, torch) load on first use, so ``wsi-apl --help`` stays fast.
"""

from __future__ import annotations

__all__ = ["write_report", "build_report"]


def __getattr__(name: str):
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
