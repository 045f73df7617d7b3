"""Worker side: a plugin that loads each model bundle once per worker process, and the task functions.

Tasks carry only ``(slide path, area box, bundle id)``; workers read the pixels themselves and look
the bundle up in this plugin, which loads it when the worker joins (keyed by the bundle id, which
hashes its weights) and keeps it for the life of the worker.
"""

from __future__ import annotations

import logging
import os
import threading

from distributed import WorkerPlugin, get_worker

PLUGIN_NAME = "wsi-apl-bundles"


class BundlePlugin(WorkerPlugin):
    """Knows where each bundle id lives; loads it once per worker process."""

    name = PLUGIN_NAME

    def __init__(self, bundles: dict[str, str], torch_threads: int = 1, device: str = "auto"):
        self.bundles = dict(bundles)
        self.torch_threads = int(torch_threads)
        self.device = device
        self._cache: dict = {}
        self._lock: threading.Lock | None = None  # made on the worker (locks do not pickle)

    def setup(self, worker) -> None:
        import torch

        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        self._cache = {}
        self._lock = threading.Lock()
        if self.device == "auto":
            self.device = worker_device(getattr(worker, "name", None))
        self.warm()

    def warm(self) -> None:
        """Import the task code and load every registered bundle now, while the worker joins.

        Otherwise the first tasks of every worker pay for it (about 2 s of imports and weights per
        CPU worker): the start of a scan, not its throughput, and a cluster that is up is then ready.
        A bundle that cannot be loaded here is only logged: the task that needs it raises the same
        error again, with its message, and that slide is reported as failed.
        """
        import tile_selector.select  # noqa: F401 - the selection task's modules, imported once here
        import workers.area  # noqa: F401

        for bundle_id in self.bundles:
            try:
                self.models(bundle_id)
            except Exception as exc:  # noqa: BLE001 - reported again by the task that needs this bundle
                logging.getLogger(__name__).warning("bundle %s not loaded on this worker: %s", bundle_id, exc)

    def models(self, bundle_id: str):
        from workers.area import load_models
        from workers.bundle import load_bundle

        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            m = self._cache.get(bundle_id)
            if m is None:
                path = self.bundles.get(bundle_id)
                if path is None:
                    raise KeyError(f"bundle {bundle_id} is not registered on this worker")
                bundle = load_bundle(path)
                if bundle.id != bundle_id:
                    raise RuntimeError(f"{path}: the bundle changed during the scan (id {bundle.id}, expected "
                                       f"{bundle_id}); restart the scan")
                m = load_models(bundle, self.device)
                self._cache[bundle_id] = m
            return m


def worker_device(name, n_gpus: int | None = None) -> str:
    """The device of one worker: its own GPU when a node runs one worker per GPU.

    Workers started together on one node (a LocalCluster, or ``dask worker --nworkers N`` in a SLURM
    job) all see every GPU; each takes GPU ``k mod n`` where ``k`` is the number its name ends with
    (LocalCluster names workers 0, 1, …; dask-jobqueue ``<job>-0``, ``<job>-1``, …). A site that
    pins GPUs itself (``CUDA_VISIBLE_DEVICES`` per worker) leaves one GPU visible: ``cuda:0``.
    """
    if n_gpus is None:
        try:
            import torch

            n_gpus = torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - a torch without CUDA
            n_gpus = 0
    if not n_gpus:
        return "cpu"
    digits = ""
    for ch in reversed(str(name if name is not None else "")):
        if not ch.isdigit():
            break
        digits = ch + digits
    return f"cuda:{int(digits) % n_gpus if digits else 0}"


def _plugin() -> BundlePlugin:
    return get_worker().plugins[PLUGIN_NAME]


def select_task(path: str, area_size: tuple[int, int], area_mpp: float, selector: dict, reader: str,
                slide_mpp: float | None):
    """Choose a slide's areas (runs on a worker, which reads the slide itself).

    The overview picture and zone map stay on the worker: the client needs only the areas and QC.
    """
    from tile_selector.select import SelectorConfig, select_file

    sel = select_file(path, tuple(area_size), area_mpp, SelectorConfig(**selector), reader, slide_mpp)
    sel.overview = None
    sel.zone_map = None
    return sel


def area_task(path: str, box: tuple[float, float, float, float], index: int, bundle_id: str, reader: str,
              slide_mpp: float | None, size: tuple[int, int] | None = None):
    """Detect, classify and measure the cells of one area (runs on a worker)."""
    from workers.area import process_area

    table = process_area(path, box, _plugin().models(bundle_id), index, reader, slide_mpp, size)
    table.timings["worker"] = os.getpid()
    return table
