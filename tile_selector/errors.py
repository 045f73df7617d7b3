"""Errors a user can act on: each names the file, what is wrong, and what to do."""

from __future__ import annotations

from pathlib import Path


class SlideError(Exception):
    """A slide that cannot be used. ``str(err)`` is one line: file, cause, fix."""

    def __init__(self, path: str | Path, cause: str, fix: str = ""):
        self.path = str(path)
        self.cause = cause
        self.fix = fix
        super().__init__(f"{self.path}: {cause}" + (f" ({fix})" if fix else ""))


class UnsupportedFormat(SlideError):
    """The file is not a slide format any of the readers understands."""


class UnreadableSlide(SlideError):
    """The file claims a supported format but cannot be read (truncated, corrupt, empty levels)."""


class MissingResolution(SlideError):
    """No usable µm-per-pixel in the file, and none given with ``--mpp``."""


class ResolutionTooCoarse(SlideError):
    """The slide is coarser than the resolution asked for by more than the tolerance (25 %)."""
