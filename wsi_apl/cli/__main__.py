"""``python -m wsi_apl.cli``: the same as ``wsi-apl``."""

from . import main

main()
