"""What both sides of the Keras import share (:mod:`wsi_apl.keras_import`): its error, and the files
by which the child process that reads a model (:mod:`wsi_apl.keras_child`) hands back its results to
the calling process. Kept apart so that neither side has to import the other.
"""

from __future__ import annotations

import numpy as np

CHECK_IMAGES = 4
CHILD_FACTS, CHILD_ARRAYS, CHILD_ERROR = "facts.json", "arrays.safetensors", "error.txt"


class KerasImportError(Exception):
    """A Keras model that cannot be imported, naming the file and what to do."""


def child_array(arrays: dict, key: str, path) -> np.ndarray:
    """``arrays[key]`` of the child's results; a missing key is the child's fault, so nothing is written."""
    if key not in arrays:
        raise KerasImportError(f"{path}: the Keras child process gave no {key}; nothing was written")
    return arrays[key]
