"""Getting a Dask client: an embedded LocalCluster by default, or an existing scheduler.

Facts the design respects:

- a nanny-started worker sets ``OMP_NUM_THREADS=1``; the LocalCluster here sets the torch thread
  count per worker explicitly (``distributed.nanny.pre-spawn-environ`` and the bundle plugin);
- the LocalCluster's dashboard and scheduler listen on loopback only;
- tasks get explicit keys, so a resubmitted area is a new task, not a cached failure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import dask
from distributed import Client, LocalCluster

from .plugin import BundlePlugin


@dataclass
class ClusterHandle:
    client: Client
    cluster: LocalCluster | None
    dashboard: str
    workers: int
    gpus: int

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def _gpu_count() -> int:
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # torch without CUDA support
        return 0


def start_cluster(scheduler: str | None = None, n_workers: int | None = None, torch_threads: int | None = None,
                  memory_limit: str = "auto", security=None) -> ClusterHandle:
    """Connect to ``scheduler`` (``tcp://`` or ``tls://``) or start a LocalCluster on loopback.

    The LocalCluster gets one worker per GPU, or CPU workers (default: one per two cores, at least
    one) with ``torch_threads`` threads each so the cores are used but not oversubscribed.
    """
    if scheduler:
        client = Client(scheduler, security=security, timeout="30s")
        info = client.scheduler_info()
        workers = info.get("workers", {})
        gpus = sum(1 for w in workers.values() if w.get("resources", {}).get("GPU"))
        return ClusterHandle(client, None, client.dashboard_link or "", len(workers), gpus)
    cores = os.cpu_count() or 1
    gpus = _gpu_count()
    if n_workers is None:
        n_workers = gpus or max(1, min(cores, 2) if cores <= 2 else cores // 2)
    threads = torch_threads or max(1, cores // n_workers)
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "OPENBLAS_NUM_THREADS": str(threads)})
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env,
                          "distributed.scheduler.allowed-failures": 2}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", memory_limit=memory_limit,
                               silence_logs=logging.ERROR,
                               resources={"GPU": 1} if gpus else None)
        client = Client(cluster)
    return ClusterHandle(client, cluster, client.dashboard_link or "", n_workers, gpus)


def register_bundles(handle: ClusterHandle, bundles: dict[str, str], torch_threads: int | None = None,
                     remote: bool = False) -> None:
    """Tell every worker (present and future) where the bundles are; each loads them once on first use.

    On the embedded cluster the torch thread count is the cores per worker; on a remote cluster it is
    left to the site's environment (``torch_threads=0``), since this machine's cores say nothing there.
    """
    if torch_threads is None:
        torch_threads = 0 if remote else max(1, (os.cpu_count() or 1) // max(1, handle.workers))
    handle.client.register_plugin(BundlePlugin(bundles, torch_threads))
