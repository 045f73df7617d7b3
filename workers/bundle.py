"""Model bundles: one directory holding every model a scan needs, with hashes.

Layout::

    BUNDLE/
      bundle.json            name, version, mpp, area size, heads, parts (config, metrics,
                             provenance, file, sha256), whether trained on synthetic data
      detector.safetensors   written by ``wsi-apl train detector``
      cells.safetensors      written by ``wsi-apl train cells``
      slide_nets.safetensors written by ``wsi-apl train enn``

Each training step adds or replaces its own part. Loading verifies every hash; only safetensors
files are read (no pickles). The bundle id is derived from the part hashes and the working
geometry, so two bundles with the same weights and settings share an id.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUNDLE_FILE = "bundle.json"
PARTS = ("detector", "cells", "slide_nets")
FORMAT_VERSION = 1


class BundleError(Exception):
    """A bundle that cannot be used, with the directory and what to do."""


def update_hash(h, path: str | os.PathLike, chunk: int = 4 << 20) -> None:
    """Feed a whole file into the hash object ``h``, streamed in chunks."""
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    update_hash(h, path)
    return h.hexdigest()


def replace_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Replace ``path`` so that a reader, a crash or a power cut sees the old file or the new one, never
    half of one: ``write`` fills a uniquely named temporary file next to it (two writers never share
    one), which is fsync'd and renamed into place, and the folder is fsync'd. On any failure the
    temporary file goes and ``path`` is untouched. The one rule for every file the project replaces
    (bundle weights and bundle.json here; triage.csv and scan_state.json through
    :func:`wsi_apl.triage.atomic_write`)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return path


def _write_json_atomic(path: Path, data: dict) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False),
                                                        encoding="utf-8"))


@dataclass
class ModelBundle:
    path: Path
    meta: dict

    # -- facts ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def mpp(self) -> float:
        """The working resolution (µm/px); a bundle trained on pictures without one cannot scan slides."""
        if self.meta.get("mpp") is None:
            raise BundleError(f"{self.path}: this bundle was trained on pictures without a pixel size, so it works "
                              "on pictures at their own pixels only; retrain with --mpp to scan slides")
        return float(self.meta["mpp"])

    @property
    def mpp_known(self) -> bool:
        return self.meta.get("mpp") is not None

    @property
    def area_size(self) -> tuple[int, int]:
        w, h = self.meta["area_size"]
        return int(w), int(h)

    @property
    def heads(self) -> list[str]:
        return list(self.meta.get("heads", []))

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic", False))

    @property
    def label(self) -> str:
        """How every output names this bundle (synthetic bundles say so)."""
        tag = " (demo model trained on synthetic data — not for diagnosis)" if self.synthetic else ""
        return f"{self.name}@{self.id}{tag}"

    @property
    def id(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"mpp": self.meta.get("mpp"), "area_size": self.meta.get("area_size")},
                            sort_keys=True).encode())
        for part in PARTS:
            p = self.meta.get("parts", {}).get(part)
            if p:
                h.update(f"{part}:{p['sha256']}".encode())
                h.update(json.dumps(p.get("config", {}), sort_keys=True).encode())
                h.update(json.dumps(p.get("decision", {}), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def part(self, name: str) -> dict | None:
        return self.meta.get("parts", {}).get(name)

    def has(self, name: str) -> bool:
        return self.part(name) is not None

    def require(self, *names: str) -> None:
        missing = [n for n in names if not self.has(n)]
        if missing:
            steps = {"detector": "wsi-apl train detector", "cells": "wsi-apl train cells",
                     "slide_nets": "wsi-apl train enn"}
            raise BundleError(f"{self.path}: the bundle has no {', '.join(missing)} model "
                              f"(train it with: {'; '.join(steps[m] for m in missing)})")

    # -- weights -------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Problems found (missing files, hash mismatches); empty when the bundle is sound."""
        problems = []
        for name, p in self.meta.get("parts", {}).items():
            f = self.path / p["file"]
            if not f.exists():
                problems.append(f"{name}: {p['file']} is missing")
                continue
            digest = sha256_file(f)
            if digest != p["sha256"]:
                problems.append(f"{name}: {p['file']} has sha256 {digest[:12]}…, bundle.json says "
                                f"{p['sha256'][:12]}… (the file was changed or damaged)")
        return problems

    def load_tensors(self, name: str, verify: bool = True):
        """The tensors of part ``name`` (dict of torch tensors), after checking its hash."""
        from safetensors.torch import load_file

        self.require(name)
        p = self.part(name)
        f = self.path / p["file"]
        if not f.exists():
            raise BundleError(f"{f}: weight file missing (re-run the training step or copy the whole bundle)")
        if verify:
            digest = sha256_file(f)
            if digest != p["sha256"]:
                raise BundleError(f"{f}: sha256 mismatch, the weights were changed or damaged "
                                  "(copy the bundle again, or re-train this part)")
        return load_file(str(f))

    def summary(self) -> dict:
        out = {"path": str(self.path), "id": self.id, "name": self.name, "synthetic": self.synthetic,
               "mpp": self.meta.get("mpp"), "area_size": list(self.area_size), "heads": self.heads,
               "created": self.meta.get("created"), "parts": {}}
        for name, p in self.meta.get("parts", {}).items():
            out["parts"][name] = {"file": p["file"], "sha256": p["sha256"], "config": p.get("config", {}),
                                  "metrics": p.get("metrics", {}), "provenance": p.get("provenance", {}),
                                  "trained": p.get("trained")}
            if "decision" in p:
                out["parts"][name]["decision"] = p["decision"]
        return out


def load_bundle(path: str | os.PathLike, verify: bool = True) -> ModelBundle:
    """Open a bundle directory; with ``verify`` every weight file's hash is checked."""
    path = Path(path)
    meta_file = path / BUNDLE_FILE
    if not meta_file.exists():
        raise BundleError(f"{path}: not a model bundle (no {BUNDLE_FILE}); create one with "
                          "'wsi-apl train all COHORT --out DIR' or 'wsi-apl demo'")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_file}: not valid JSON ({exc}); restore the bundle from a copy") from exc
    bundle = ModelBundle(path, meta)
    if verify:
        problems = bundle.verify()
        if problems:
            raise BundleError(f"{path}: " + "; ".join(problems))
    return bundle


def create_bundle(path: str | os.PathLike, *, name: str, mpp: float | None, area_size: tuple[int, int],
                  heads: list[str], synthetic: bool, description: str = "") -> ModelBundle:
    """Create (or re-describe) a bundle directory; existing parts are kept only if the geometry matches."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta_file = path / BUNDLE_FILE
    meta = {"format": FORMAT_VERSION, "name": name, "description": description, "created": _now(),
            "mpp": None if mpp is None else float(mpp), "area_size": [int(area_size[0]), int(area_size[1])], "heads": list(heads),
            "synthetic": bool(synthetic), "parts": {}}
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old.get("mpp") == meta["mpp"] and old.get("area_size") == meta["area_size"]:
            meta["parts"] = old.get("parts", {})
            meta["created"] = old.get("created", meta["created"])
            meta["synthetic"] = bool(old.get("synthetic", False)) or meta["synthetic"]
    _write_json_atomic(meta_file, meta)
    return ModelBundle(path, meta)


def save_part(bundle: ModelBundle, part: str, tensors: dict, *, config: dict, metrics: dict | None = None,
              provenance: dict | None = None, decision: dict | None = None,
              synthetic: bool | None = None) -> ModelBundle:
    """Write ``part``'s weights (safetensors, atomically) and record them in bundle.json."""
    from safetensors.torch import save_file

    if part not in PARTS:
        raise ValueError(f"unknown bundle part {part!r}")
    path = bundle.path
    fname = f"{part}.safetensors"
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    replace_atomically(path / fname, lambda tmp: save_file(plain, str(tmp), metadata={"part": part,
                                                                                       "bundle": bundle.name}))
    meta = json.loads((path / BUNDLE_FILE).read_text())
    entry = {"file": fname, "sha256": sha256_file(path / fname), "config": config, "metrics": metrics or {},
             "provenance": provenance or {}, "trained": _now()}
    if decision is not None:
        entry["decision"] = decision
    meta.setdefault("parts", {})[part] = entry
    if synthetic:
        meta["synthetic"] = True
    _write_json_atomic(path / BUNDLE_FILE, meta)
    return ModelBundle(path, meta)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
