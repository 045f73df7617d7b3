"""The statuses of a slide: one enum for the ledger, the triage list, the CLI and the cell store.

Decision support only: ``not_flagged`` never excludes APL.
"""

from __future__ import annotations

import enum

#: What every output says (triage list, report, exports, CLI).
DECISION_SUPPORT = ("Decision support only: an expert must review every slide; "
                    "not_flagged does not exclude APL.")


class Status(enum.StrEnum):
    FLAGGED = "flagged"              # the slide-level rule fired: an expert looks first
    INCONCLUSIVE = "inconclusive"    # analysed, but the tool could not earn a call (QC, too few cells, CI wide)
    FAILED = "failed"                # could not be analysed (the reason says why and what to do)
    NOT_ANALYSED = "not_analysed"    # seen, but without a result of this scan's bundle (deadline, crash, in hand)
    NOT_FLAGGED = "not_flagged"      # analysed, the rule did not fire; does not exclude APL


#: What a finished analysis gives (a result that a rerun with the same bundle keeps).
RESULTS = (Status.FLAGGED, Status.NOT_FLAGGED, Status.INCONCLUSIVE)
#: Order of the triage list: what needs an expert first, not_flagged last.
TRIAGE_ORDER = {Status.FLAGGED: 0, Status.INCONCLUSIVE: 1, Status.FAILED: 2, Status.NOT_ANALYSED: 3,
                Status.NOT_FLAGGED: 4}
#: States that only the ledger knows (a slide in hand, a file seen but not yet fingerprinted).
RUNNING, PENDING = "running", "pending"
