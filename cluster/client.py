"""Getting a Dask client: an embedded LocalCluster by default, an existing scheduler, or SLURM.

- default: a LocalCluster on this machine (one worker per GPU, or CPU workers);
- ``scheduler="tls://HOST:PORT"`` with a :class:`TlsFiles` for an existing cluster (``dask
  scheduler`` / ``dask worker`` started by the site), or ``tcp://`` on loopback (or anywhere with
  ``--insecure``);
- :class:`SlurmOptions` through dask-jobqueue: one worker per GPU, each job asking for its GPUs.

Dask connections must be trusted: a task is pickled code that the worker unpickles and runs, and a
result is unpickled by the client, so whoever can talk to the scheduler runs code as its workers'
user. The embedded LocalCluster and the SLURM cluster therefore use TLS with temporary
certificates (``Security.temporary()``), made afresh for each run: every connection, client,
worker or nanny, must show that certificate, which only this process (and, on SLURM, the files
dask-jobqueue writes with mode 0600 for the jobs) has. A plain ``tcp://`` scheduler on another host
is refused unless the network is declared trusted (``--insecure``).

Facts the design respects:

- a nanny-started worker sets ``OMP_NUM_THREADS=1``; the LocalCluster here sets the torch thread
  count per worker explicitly (``distributed.nanny.pre-spawn-environ`` and the bundle plugin);
- the LocalCluster's dashboard and scheduler listen on loopback only, the scheduler, workers and
  nannies over TLS (loopback alone would let every local user in);
- tasks get explicit keys, so a resubmitted area is a new task, not a cached failure.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import dask
from distributed import Client, LocalCluster

from .plugin import BundlePlugin

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """A cluster could not be set up as asked (the message says what to change)."""


@dataclass
class TlsFiles:
    """How to reach an existing scheduler safely: certificates for a ``tls://`` scheduler (PEM files,
    as for ``dask scheduler --tls-*``), or ``insecure`` to accept a plain ``tcp://`` one on another
    host (``--insecure``: the network is trusted)."""

    ca_file: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False

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


def _temporary_security():
    """Fresh self-signed TLS credentials for one cluster (in memory; ``distributed.Security``)."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError as exc:
        raise ClusterError("the Dask cluster encrypts and authenticates its connections with temporary "
                           "certificates, which needs the 'cryptography' package: pip install cryptography") from exc


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_scheduler_address(scheduler: str, tls: TlsFiles) -> None:
    """Refuse a scheduler address this client should not talk to, before any connection is made.

    ``tls://`` needs the three TLS files; ``tcp://`` is neither encrypted nor authenticated, so it is
    accepted on loopback (with a warning: other users of this machine can reach it too) or, with
    ``tls.insecure``, anywhere.
    """
    if not scheduler.startswith(("tcp://", "tls://")):
        raise ClusterError(f"{scheduler}: a scheduler address starts with tcp:// or tls://")
    if scheduler.startswith("tls://") and not tls.given():
        raise ClusterError(f"{scheduler}: a tls:// scheduler needs --tls-ca-file, --tls-cert and --tls-key")
    if tls.given() and not scheduler.startswith("tls://"):
        raise ClusterError(f"{scheduler}: TLS files given for a plain tcp:// address; use tls://")
    if scheduler.startswith("tcp://"):
        from distributed.comm.addressing import parse_address, parse_host_port

        try:
            host, _ = parse_host_port(parse_address(scheduler)[1])
        except ValueError as exc:
            raise ClusterError(f"{scheduler}: not a scheduler address (tcp://HOST:PORT): {exc}") from exc
        if not _is_loopback(host) and not tls.insecure:
            raise ClusterError(f"{scheduler} is not encrypted and not authenticated: anyone who can reach it can "
                               "run code as this user (Dask unpickles tasks). Use tls:// with --tls-ca-file/"
                               "--tls-cert/--tls-key, or pass --insecure if this network is trusted")
        if not tls.insecure:
            log.warning("%s is a plain tcp:// scheduler: every user of this machine can reach it and run code "
                        "on its workers; prefer tls://", scheduler)


@dataclass
class SlurmOptions:
    """An ephemeral Dask cluster on SLURM through dask-jobqueue.

    Each job runs ``gpus_per_job`` worker processes (one per GPU, each advertising ``GPU_SLOTS`` slots), or one
    CPU worker when ``gpus_per_job`` is 0. ``cores`` and ``memory`` are per job.

    The scheduler and workers talk TLS with temporary certificates; dask-jobqueue writes the
    workers' copy (files ``.dask-jobqueue.worker.*``, mode 0600, removed when the cluster closes) into
    ``shared_temp_directory``, by default ``log_directory`` (which the compute nodes must see
    anyway), else the home directory.
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
    shared_temp_directory: str | None = None


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
        worker_args += ["--resources", f"GPU={GPU_SLOTS}"]
    prologue = [f"export OMP_NUM_THREADS={threads}", f"export MKL_NUM_THREADS={threads}"]
    shared = opts.shared_temp_directory or opts.log_directory or os.path.expanduser("~")
    os.makedirs(shared, exist_ok=True)  # the certificates are written before the log folder is made
    cluster = SLURMCluster(queue=opts.queue, account=opts.account, cores=opts.cores, processes=processes,
                           memory=opts.memory, walltime=opts.walltime, interface=opts.interface,
                           job_extra_directives=directives, worker_extra_args=worker_args,
                           job_script_prologue=prologue, log_directory=opts.log_directory,
                           job_name="wsi-apl", scheduler_options={"dashboard_address": "127.0.0.1:0"},
                           security=_temporary_security(), protocol="tls://", shared_temp_directory=shared)
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
    security: object | None = None  # the embedded or SLURM cluster's temporary TLS credentials

    def tls_files(self, folder: Path) -> TlsFiles:
        """Write this cluster's temporary credentials as PEM files (mode 0600) into ``folder``, so that
        another process of this user can join it (``--scheduler ADDRESS --tls-ca-file … --tls-cert …
        --tls-key …``); they are useless once the cluster is closed."""
        if self.security is None:
            raise ClusterError("this cluster was not started here: its TLS files are the site's")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = TlsFiles(folder / "dask-ca.pem", folder / "dask-cert.pem", folder / "dask-key.pem")
        for path, pem in ((files.ca_file, self.security.tls_ca_file), (files.cert, self.security.tls_client_cert),
                          (files.key, self.security.tls_client_key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(pem)
        return files

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
                for name in ("_job_ca_file", "_job_cert", "_job_key"):  # dask-jobqueue's copies for the jobs
                    f = getattr(self.cluster, name, None)
                    if f is not None:
                        f.close()  # a NamedTemporaryFile: closing removes it


#: Area tasks a GPU worker runs at once (each asks for one slot of its ``GPU`` resource): the forward
#: passes take turns (one lock per worker, :class:`workers.area.LoadedModels`), so while one area is on
#: the card the next one is read and decoded, and the last one's cells measured, on the host.
GPU_SLOTS = 2


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
    """Connect to ``scheduler`` (``tls://``, or ``tcp://`` as :func:`check_scheduler_address` allows),
    start SLURM jobs, or a LocalCluster on loopback; the last two use TLS with temporary certificates.

    The LocalCluster gets one worker per GPU (with :data:`GPU_SLOTS` task threads and slots, and one
    more thread for the selections), or CPU workers (default: one per two cores, at least one) with
    ``torch_threads`` threads each so the cores are used but not oversubscribed. On SLURM
    the client waits up to ``wait_s`` for the first worker (jobs may queue).
    """
    tls = tls or TlsFiles()
    if scheduler and slurm:
        raise ClusterError("give either --scheduler or --cluster slurm, not both")
    if scheduler:
        check_scheduler_address(scheduler, tls)
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
        return ClusterHandle(client, cluster, loopback_dashboard(cluster), workers, gpus, cluster.security)
    cores = os.cpu_count() or 1
    gpus = _gpu_count()
    if n_workers is None:
        n_workers = gpus or max(1, min(cores, 2) if cores <= 2 else cores // 2)
    threads = torch_threads or max(1, cores // n_workers)
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "OPENBLAS_NUM_THREADS": str(threads)})
    # Dask's default MALLOC_TRIM_THRESHOLD_=65536 fixes glibc's mmap threshold at 128 KiB, so every
    # temporary array of the selector's measures is mmap'd and faulted in afresh: selections ran 1.6x
    # slower in a worker than in a plain process (benchmarks/bench_scan.py). glibc's own adaptive
    # thresholds instead; a worker's memory is mostly its models, which stay.
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    security = _temporary_security()
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env,
                          "distributed.scheduler.allowed-failures": 2,
                          # the statistical profiler takes the GIL every 10 ms from tasks that are
                          # Python-heavy (the selector); the dashboard keeps its task stream
                          "distributed.worker.profile.enabled": False}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=GPU_SLOTS + 1 if gpus else 1, processes=True,
                               host="127.0.0.1",
                               protocol="tls://", security=security,
                               dashboard_address="127.0.0.1:0", memory_limit=memory_limit,
                               silence_logs=logging.ERROR,
                               resources={"GPU": GPU_SLOTS} if gpus else None)
        client = Client(cluster, security=security)
    return ClusterHandle(client, cluster, client.dashboard_link or "", n_workers, gpus, security)


def register_bundles(handle: ClusterHandle, bundles: dict[str, str], torch_threads: int | None = None,
                     remote: bool = False) -> None:
    """Tell every worker (present and future) where the bundles are; each loads them once on first use.

    On the embedded cluster the torch thread count is the cores per worker; on a remote cluster it is
    left to the site's environment (``torch_threads=0``), since this machine's cores say nothing there.
    """
    if torch_threads is None:
        torch_threads = 0 if remote else max(1, (os.cpu_count() or 1) // max(1, handle.workers))
    handle.client.register_plugin(BundlePlugin(bundles, torch_threads))
