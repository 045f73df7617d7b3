"""Slide access (openslide, tiffslide, plain pictures; mpp-aware reads) and area selection.

Knows nothing of torch or Dask. Public interface::

    from tile_selector import open_slide, select_areas, SelectorConfig
"""

from .errors import MissingResolution, ResolutionTooCoarse, SlideError, UnreadableSlide, UnsupportedFormat
from .select import Area, Selection, SelectorConfig, select_areas, select_file
from .slide import SLIDE_EXTENSIONS, Slide, open_slide, open_slide_cached

__all__ = [
    "Area", "MissingResolution", "ResolutionTooCoarse", "SLIDE_EXTENSIONS", "Selection", "SelectorConfig",
    "Slide", "SlideError", "UnreadableSlide", "UnsupportedFormat", "open_slide", "open_slide_cached",
    "select_areas", "select_file",
]
