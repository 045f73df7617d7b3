"""A closed cluster: only this process (and the jobs it starts) can talk to its Dask scheduler and workers.

A Dask task is pickled code that a worker unpickles and runs, so a connection to the scheduler, a
worker or a nanny is the power to run code as this user. The embedded LocalCluster and the SLURM
cluster therefore use TLS with temporary certificates; here another local user's attempts (plain
tcp, TLS without a certificate, TLS with a certificate of their own) are refused at the handshake,
and a plain tcp:// scheduler on another host is refused before any connection is made.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import ssl
import stat
from types import SimpleNamespace

import pytest
from distributed.comm import connect
from distributed.security import Security

from cluster.client import ClusterError, ClusterHandle, TlsFiles, check_scheduler_address, start_cluster


@pytest.fixture(scope="module")
def cluster():
    handle = start_cluster(n_workers=1, torch_threads=1, memory_limit="1GB")
    yield handle
    handle.close()


async def _identity(address: str, **connection_args):
    """What the Dask protocol answers to ``identity`` on ``address``, or the exception it raised."""
    try:
        comm = await connect(address, timeout=5, **connection_args)
    except Exception as exc:  # noqa: BLE001 - the refusal is what is tested
        return exc
    try:
        await comm.write({"op": "identity"})
        return await asyncio.wait_for(comm.read(), 5)
    except Exception as exc:  # noqa: BLE001
        return exc
    finally:
        await comm.close()


def _intruder_contexts(tmp_path) -> dict[str, ssl.SSLContext]:
    """TLS client contexts another local user could make: no certificate, or a self-signed one of
    their own; neither checks the server, so only the server's check of the client is tested."""
    mine = Security.temporary()
    (tmp_path / "c.pem").write_text(mine.tls_client_cert)
    (tmp_path / "k.pem").write_text(mine.tls_client_key)
    out = {}
    for name, with_cert in (("no certificate", False), ("own certificate", True)):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if with_cert:
            ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
        out[name] = ctx
    return out


def test_embedded_cluster_refuses_connections_without_its_certificate(cluster, tmp_path):
    client = cluster.client
    info = client.scheduler_info()
    assert info["address"].startswith("tls://127.0.0.1:")
    workers = list(info["workers"])
    nannies = [w["nanny"] for w in info["workers"].values()]
    assert workers and all(a.startswith("tls://127.0.0.1:") for a in workers + nannies)
    assert client.submit(lambda x: x + 1, 1, key="tls-probe").result(timeout=30) == 2  # the cluster works

    # this process, with the cluster's credentials, is let in
    ok = asyncio.run(_identity(info["address"], **cluster.security.get_connection_args("client")))
    assert isinstance(ok, dict) and ok.get("type") == "Scheduler"
    # another local user is not, whichever listener they pick: the scheduler, a worker (which runs
    # pickled functions too) or a nanny
    contexts = _intruder_contexts(tmp_path)
    for address in [info["address"], *workers, *nannies]:
        plain = asyncio.run(_identity(address.replace("tls://", "tcp://")))
        assert isinstance(plain, OSError), (address, plain)
        for name, ctx in contexts.items():
            got = asyncio.run(_identity(address, ssl_context=ctx))
            assert isinstance(got, OSError), (address, name, got)  # the handshake fails: no identity


def test_a_plain_client_cannot_submit(cluster):
    from distributed import Client

    address = cluster.client.scheduler.address
    for attempt in (address, address.replace("tls://", "tcp://")):
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do; no connection is the point
            Client(attempt, timeout="5s").close()
        _collect_refused_clients()
    with pytest.raises(Exception):  # noqa: B017
        Client(address, security=Security.temporary(), timeout="5s").close()
    _collect_refused_clients()


def _collect_refused_clients() -> None:
    """Collect a refused Client here, in the main thread: collected later inside another client's IO loop
    thread, its ``__del__`` -> ``close()`` waited on that loop's lock and hung a CI run for 20 minutes."""
    gc.collect()


def test_tls_files_let_this_user_join(cluster, tmp_path):
    from distributed import Client

    files = cluster.tls_files(tmp_path / "tls")
    for f in (files.ca_file, files.cert, files.key):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    with Client(cluster.client.scheduler.address, security=files.security(), timeout="10s") as c:
        assert c.submit(lambda: "in", key="tls-files-probe").result(timeout=30) == "in"


# -- scheduler addresses: checked before any connection -------------------------------------------------


@pytest.mark.parametrize("address", ["tcp://10.0.0.5:8786", "tcp://192.168.1.2:8786", "tcp://scheduler.lab:8786",
                                     "tcp://[2001:db8::1]:8786", "tcp://0.0.0.0:8786"])
def test_plain_tcp_off_this_host_is_refused_without_insecure(address):
    with pytest.raises(ClusterError, match="not encrypted and not authenticated.*--insecure"):
        check_scheduler_address(address, TlsFiles())
    with pytest.raises(ClusterError, match="not encrypted and not authenticated"):
        start_cluster(scheduler=address)  # refused in words before connecting (nothing listens there)
    check_scheduler_address(address, TlsFiles(insecure=True))  # the site says its network is trusted


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:8786", "tcp://127.3.0.1:8786", "tcp://localhost:8786",
                                     "tcp://[::1]:8786"])
def test_plain_tcp_on_loopback_is_accepted_with_a_warning(address, caplog):
    with caplog.at_level(logging.WARNING, logger="cluster.client"):
        check_scheduler_address(address, TlsFiles())
    assert "every user of this machine can reach it" in caplog.text


def test_tls_address_still_needs_the_files():
    with pytest.raises(ClusterError, match="--tls-ca-file"):
        check_scheduler_address("tls://10.0.0.5:8786", TlsFiles())
    with pytest.raises(ClusterError, match="use tls://"):
        check_scheduler_address("tcp://10.0.0.5:8786", TlsFiles(ca_file="a", cert="b", key="c", insecure=True))


def test_cli_insecure_flag_reaches_the_check(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import wsi_apl.scan
    from wsi_apl.cli import main

    seen = []

    def fake_scan(opts, log):
        seen.append(opts)
        check_scheduler_address(opts.scheduler, opts.tls)  # what start_cluster does first
        return {"counts": {}}

    monkeypatch.setattr(wsi_apl.scan, "scan", fake_scan)
    slides = tmp_path / "slides"
    slides.mkdir()
    args = ["scan", str(slides), "--out", str(tmp_path / "out"), "--bundle", str(tmp_path / "bundle"),
            "--scheduler", "tcp://10.0.0.5:8786"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "not encrypted and not authenticated" in r.output and "--insecure" in r.output
    r = CliRunner().invoke(main, [*args, "--insecure"])
    assert r.exit_code == 0, r.output
    assert [o.tls.insecure for o in seen] == [False, True]


# -- SLURM: the job script dask-jobqueue would submit ----------------------------------------------------


def test_slurm_cluster_uses_tls_with_private_temporary_certificates(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from cluster.client import SlurmOptions, slurm_cluster

    logs = tmp_path / "slurm-logs"
    cluster = slurm_cluster(SlurmOptions(queue="gpu", gpus_per_job=1, cores=2, memory="4GB",
                                         log_directory=str(logs)), submit=False)
    handle = ClusterHandle(SimpleNamespace(close=lambda: None), cluster, "", 0, 0, cluster.security)
    try:
        script = cluster.job_script()
        assert cluster.scheduler_address.startswith("tls://")
        assert f" {cluster.scheduler_address} " in script
        assert "--protocol tls://" in script
        shipped = {opt: script.split(opt + " ")[1].split()[0] for opt in ("--tls-ca-file", "--tls-cert", "--tls-key")}
        for path in shipped.values():  # in-memory certificates written for the jobs, readable by this user only
            assert path.startswith(str(logs)) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert "BEGIN" not in script  # no key material in the script itself
    finally:
        handle.close()
    assert not any(os.path.exists(p) for p in shipped.values())  # removed with the cluster
