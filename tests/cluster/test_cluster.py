"""The cluster plumbing on a real LocalCluster: selection tasks on workers, bounded window, errors."""

from __future__ import annotations

import pytest

from cluster.client import start_cluster
from cluster.plugin import PLUGIN_NAME, BundlePlugin, area_task, select_task
from cluster.submit import TaskWindow


@pytest.fixture(scope="module")
def cluster():
    handle = start_cluster(n_workers=2, torch_threads=1)
    yield handle
    handle.close()


def _boom(x):
    raise ValueError(f"bad input {x}")


def _square(x):
    return x * x


def test_local_cluster_is_on_loopback(cluster):
    assert cluster.workers == 2
    info = cluster.client.scheduler_info()
    assert info["address"].startswith("tls://127.0.0.1")  # TLS with temporary certificates: see test_security
    assert "127.0.0.1" in cluster.dashboard


def _worker_settings():
    import os

    import dask

    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"), dask.config.get(
        "distributed.worker.profile.enabled")


def test_workers_run_without_dasks_malloc_trim_and_profiler(cluster):
    """Dask's MALLOC_TRIM_THRESHOLD_ made every temporary array of the selector an mmap (selections
    1.6x slower in a worker), and its 10-ms profiler takes the GIL from Python-heavy tasks."""
    trim, omp, profile = cluster.client.submit(_worker_settings, pure=False).result()
    assert trim is None and omp == "1" and profile is False


def test_window_bounds_in_flight_and_reports_errors(cluster):
    w = TaskWindow(cluster.client, max_in_flight=3)
    for i in range(10):
        w.add(("sq", i), f"sq-test-{i}", _square, i)
        assert w.in_flight <= 3
    w.add(("boom", 0), "boom-test-0", _boom, 7)
    results = {}
    errors = {}
    for done in w.results():
        assert w.in_flight <= 3
        if done.ok:
            results[done.tag] = done.value
        else:
            errors[done.tag] = done.error
    assert results == {("sq", i): i * i for i in range(10)}
    assert "bad input 7" in errors[("boom", 0)]


def test_selection_runs_on_a_worker_that_reads_the_slide(cluster, small_cohort):
    w = TaskWindow(cluster.client, max_in_flight=2)
    path = str(small_cohort / "slide_0003_002.tiff")
    w.add("sel", "select-test-1", select_task, path, (256, 192), 0.5, {"max_areas": 3, "target_cells": 0}, "auto", None)
    w.add("bad", "select-test-2", select_task, str(small_cohort / "labels.csv"), (256, 192), 0.5, {}, "auto", None)
    out = {d.tag: d for d in w.results()}
    assert out["sel"].ok and out["sel"].value.status == "ok" and out["sel"].value.areas
    assert out["sel"].value.overview is None  # pictures stay on the worker
    assert not out["bad"].ok and "labels.csv" in out["bad"].error
    # tasks carry the path, not pixels: a few hundred bytes each, pickled
    assert w.bytes_submitted < 2000


def _loaded_bundles(dask_worker):
    return sorted(dask_worker.plugins[PLUGIN_NAME]._cache)


def test_workers_load_the_bundle_when_they_join_and_a_missing_one_fails_its_task(cluster, trained, small_cohort,
                                                                                tmp_path):
    """The models are loaded while the plugin is registered (the first tasks do not pay for them); a
    bundle that cannot be loaded does not stop the registration, and the task that needs it names it."""
    _, bundle = trained
    gone = "f" * 16
    cluster.client.register_plugin(BundlePlugin({bundle.id: str(bundle.path.resolve()),
                                                 gone: str(tmp_path / "gone-bundle")}, 1))
    loaded = cluster.client.run(_loaded_bundles)
    assert len(loaded) == 2 and all(ids == [bundle.id] for ids in loaded.values())
    slide = str(small_cohort / "slide_0003_002.tiff")
    fut = cluster.client.submit(area_task, slide, (0, 0, 512, 384), 0, gone, "auto", None, pure=False)
    with pytest.raises(Exception, match="gone-bundle: not a model bundle"):
        fut.result()
