"""wsi-apl: whole-slide batch scanner that flags suspected acute promyelocytic leukemia (APL).

Decision support only: an expert must review every slide; ``not_flagged`` does not exclude APL.
"""

import os

# Intel MKL (torch's CPU BLAS) may sum in a different order from one run to the next with the same
# thread count (its own dynamic choices), so a training's weights could differ in the last bits and
# then drift: detector weights differed in 4 of 50 runs of tests/wsi_apl/test_reproducible.py, none
# in 25 with one torch thread and none in 55 with this setting. Its "conditional numerical
# reproducibility" mode fixes the order. Read at MKL's first call, so it is set when the package is
# imported (before any training or inference); a user's own setting is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
