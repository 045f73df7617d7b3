"""wsi-apl: whole-slide batch scanner that flags suspected acute promyelocytic leukemia (APL).

Decision support only: an expert must review every slide; ``not_flagged`` does not exclude APL.
"""

__version__ = "0.1.0"
