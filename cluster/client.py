"""Getting a Dask client: an embedded LocalCluster by default, an existing scheduler, or SLURM.

- default: a LocalCluster on this machine (one worker per GPU, or CPU workers);
- ``scheduler="tcp://HOST:PORT"`` or ``"tls://…"`` with a :class:`TlsFiles` for an existing cluster
  (``dask scheduler`` / ``dask worker`` started by the site);
- :class:`SlurmOptions` through dask-jobqueue: one worker per GPU, each job asking for its GPUs.

Facts the design respects:

- a nanny-started worker sets ``OMP_NUM_THREADS=1``; the LocalCluster here sets the torch thread
  count per worker explicitly (``distributed.nanny.pre-spawn-environ`` and the bundle plugin);
- the LocalCluster's dashboard and scheduler listen on loopback only;
- tasks get explicit keys, so a resubmitted area is a new task, not a cached failure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import dask
from distributed import Client, LocalCluster

from .plugin import BundlePlugin


class ClusterError(RuntimeError):
    """A cluster could not be set up as asked (the message says what to change)."""


@dataclass
class TlsFiles:
    """Certificates for a ``tls://`` scheduler (PEM files, as for ``dask scheduler --tls-*``)."""

    ca_file: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def given(self) -> bool:
        return any((self.ca_file, self.cert, self.key))

    def security(self):
        """A ``distributed.Security`` that requires encryption, after checking every file exists."""
        from distributed.security import Security

        missing = [f"--tls-{n}" for n, v in (("ca-file", self.ca_file), ("cert", self.cert), ("key", self.key))
                   if v is None]
        if missing:
            raise ClusterError("a TLS connection needs --tls-ca-file, --tls-cert and --tls-key; missing: "
                               + ", ".join(missing))
        for v in (self.ca_file, self.cert, self.key):
            if not Path(v).is_file():
                raise ClusterError(f"{v}: TLS file not found (give the PEM files the site's scheduler uses)")
        return Security(tls_ca_file=str(self.ca_file), tls_client_cert=str(self.cert),
                        tls_client_key=str(self.key), require_encryption=True)


@dataclass
class SlurmOptions:
    """An ephemeral Dask cluster on SLURM through dask-jobqueue.

    Each job runs ``gpus_per_job`` worker processes (one per GPU, each advertising ``GPU=1``), or one
    CPU worker when ``gpus_per_job`` is 0. ``cores`` and ``memory`` are per job.
    """

    queue: str | None = None
    account: str | None = None
    jobs: int = 1
    gpus_per_job: int = 1
    cores: int = 8
    memory: str = "32GB"
    walltime: str = "08:00:00"
    interface: str | None = None
    extra_directives: list[str] = field(default_factory=list)
    log_directory: str | None = None


def slurm_cluster(opts: SlurmOptions, submit: bool = True):
    """A ``dask_jobqueue.SLURMCluster`` for ``opts``; ``submit=False`` builds it without calling sbatch."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ClusterError("--cluster slurm needs dask-jobqueue: pip install 'wsi-apl[slurm]'") from exc
    if opts.jobs < 1 or opts.gpus_per_job < 0 or opts.cores < 1:
        raise ClusterError("--slurm-jobs and --slurm-cores must be at least 1, --slurm-gpus at least 0")
    processes = max(1, opts.gpus_per_job)
    threads = max(1, opts.cores // processes)
    directives = list(opts.extra_directives)
    worker_args = []
    if opts.gpus_per_job:
        directives.append(f"--gres=gpu:{opts.gpus_per_job}")
        worker_args += ["--resources", "GPU=1"]
    prologue = [f"export OMP_NUM_THREADS={threads}", f"export MKL_NUM_THREADS={threads}"]
    cluster = SLURMCluster(queue=opts.queue, account=opts.account, cores=opts.cores, processes=processes,
                           memory=opts.memory, walltime=opts.walltime, interface=opts.interface,
                           job_extra_directives=directives, worker_extra_args=worker_args,
                           job_script_prologue=prologue, log_directory=opts.log_directory,
                           job_name="wsi-apl", scheduler_options={"dashboard_address": "127.0.0.1:0"})
    if submit:
        cluster.scale(jobs=opts.jobs)
    return cluster


@dataclass
class ClusterHandle:
    client: Client
    cluster: object | None  # LocalCluster, SLURMCluster, or None for a site's scheduler
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


def loopback_dashboard(cluster) -> str:
    """The dashboard address a SLURM cluster's scheduler really listens on (loopback; reach it with
    ``ssh -L``): ``dashboard_link`` names the scheduler's public interface instead."""
    try:
        socks = cluster.scheduler.http_server._sockets.values()
        host, port = next(iter(socks)).getsockname()[:2]
        return f"http://{host}:{port}/status"
    except (AttributeError, StopIteration, OSError):
        return cluster.dashboard_link or ""


def _count(client: Client) -> tuple[int, int]:
    workers = client.scheduler_info().get("workers", {})
    return len(workers), sum(1 for w in workers.values() if w.get("resources", {}).get("GPU"))


def start_cluster(scheduler: str | None = None, n_workers: int | None = None, torch_threads: int | None = None,
                  memory_limit: str = "auto", tls: TlsFiles | None = None, slurm: SlurmOptions | None = None,
                  wait_s: float = 600.0) -> ClusterHandle:
    """Connect to ``scheduler`` (``tcp://`` or ``tls://``), start SLURM jobs, or a LocalCluster on loopback.

    The LocalCluster gets one worker per GPU, or CPU workers (default: one per two cores, at least
    one) with ``torch_threads`` threads each so the cores are used but not oversubscribed. On SLURM
    the client waits up to ``wait_s`` for the first worker (jobs may queue).
    """
    tls = tls or TlsFiles()
    if scheduler and slurm:
        raise ClusterError("give either --scheduler or --cluster slurm, not both")
    if scheduler:
        if not scheduler.startswith(("tcp://", "tls://")):
            raise ClusterError(f"{scheduler}: a scheduler address starts with tcp:// or tls://")
        if scheduler.startswith("tls://") and not tls.given():
            raise ClusterError(f"{scheduler}: a tls:// scheduler needs --tls-ca-file, --tls-cert and --tls-key")
        if tls.given() and not scheduler.startswith("tls://"):
            raise ClusterError(f"{scheduler}: TLS files given for a plain tcp:// address; use tls://")
        security = tls.security() if tls.given() else None
        try:
            client = Client(scheduler, security=security, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"{scheduler}: cannot reach the Dask scheduler ({exc}); is 'dask scheduler' "
                               "running there, and are the TLS files the site's?") from exc
        workers, _ = _count(client)
        if not workers:
            try:
                client.wait_for_workers(1, timeout=wait_s)
            except TimeoutError as exc:
                client.close()
                raise ClusterError(f"{scheduler}: no Dask worker connected within {wait_s:.0f} s; start "
                                   "'dask worker' against this scheduler") from exc
        workers, gpus = _count(client)
        return ClusterHandle(client, None, client.dashboard_link or "", workers, gpus)
    if slurm is not None:
        cluster = slurm_cluster(slurm)
        client = Client(cluster)
        try:
            client.wait_for_workers(1, timeout=wait_s)
        except TimeoutError as exc:
            client.close()
            cluster.close()
            raise ClusterError(f"no SLURM worker started within {wait_s:.0f} s (jobs still queued? see "
                               "'squeue'); try again later or ask for fewer resources") from exc
        workers, gpus = _count(client)
        return ClusterHandle(client, cluster, loopback_dashboard(cluster), workers, gpus)
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
