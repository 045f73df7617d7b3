"""Defaults of ``wsi-apl train cells`` that the command line shows (kept free of torch, so that
``wsi-apl --help`` stays quick)."""

TRAIN_CELLS_DEFAULTS = {"crop_um": 24.0, "crop_px": 128, "epochs": 60, "ema": 0.0, "patience": 15,
                        "stain_aug": "od"}
