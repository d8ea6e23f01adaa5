"""One real local Ray for the whole session (starting Ray costs 4-6 s; once is enough)."""

from __future__ import annotations

import os
import shutil

import pytest

# Tests must never pick up a developer's registered default model. The process that makes the folder's
# name (the run's first, not an xdist worker, which inherits it) removes it at the end.
_MADE_HOME = "CXR_BATCH_HOME" not in os.environ
os.environ.setdefault("CXR_BATCH_HOME", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cxr-batch-test-home-{os.getpid()}"))
os.environ.pop("CXR_BATCH_MODEL", None)


# The suite runs on two pytest-xdist workers, a file at a time (pyproject's addopts: -n 2 --dist loadfile): one
# per CPU of the build machine, where it is CPU-bound (-n 3 ran at 100% CPU and took longer). xdist hands files
# out in collection order: the longest files go first, so that neither worker is left with one of them at the end.
LONGEST_FIRST = ("test_train.py", "test_learning.py", "test_cluster.py", "test_train_resume.py", "test_s3.py", "test_failures.py",
                 "test_benchmark.py", "test_resume.py", "test_one_writer.py")


def pytest_unconfigure(config):
    if _MADE_HOME:
        shutil.rmtree(os.environ["CXR_BATCH_HOME"], ignore_errors=True)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order inside a file is kept


@pytest.fixture(scope="session")
def ray_session():
    import ray
    from ray.data import DataContext

    os.environ.pop("RAY_ADDRESS", None)
    # "local": always a new Ray of this session, never one found in /tmp/ray (another developer's
    # `ray start`, a test cluster) that a plain ray.init() would attach to.
    # log_to_driver=False: as the commands run Ray (jobs/ray_env.py), so tests see what a user sees;
    # the workers' output is in /tmp/ray/session_latest/logs.
    ray.init(address="local", num_cpus=2, logging_level="WARNING", log_to_driver=False)
    # A test that cannot get its resources fails in minutes instead of hanging for 30.
    DataContext.get_current().execution_no_progress_timeout_s = 180
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """A small labelled phantom archive shared by the tests that only read it."""
    from cxr_batch.synth.archive import make_archive

    root = tmp_path_factory.mktemp("phantoms") / "archive"
    make_archive(root, n_train=24, n_val=8, n_test=16, size=192, seed=3)
    return root


@pytest.fixture(scope="module")
def ray_address(ray_session):
    """The session Ray's address, for `cxr-batch` subprocesses that join it as second drivers (a
    second Ray on 2 CPUs would be slow to start)."""
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium (Debian's) for the session's page tests, driven by Playwright."""
    from browser import ARGS, CHROMIUM, available

    why = available()
    if why:
        if os.environ.get("CXR_REQUIRE_BROWSER"):  # CI: a missing browser is a failure, not a skip
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()
