"""Several Ray nodes: `ray job submit` of jobs/train.py and jobs/score.py to a real 2-node cluster.

The cluster is two `ray start` nodes on this machine (tests/localcluster.py: 3 CPUs each, the head
included, token authentication on), and the archive and every output live on a loopback S3
server (tests/s3server.py). The AWS_* variables reach the job drivers and all Ray workers only
through the job's runtime_env, as they must on a real cluster whose nodes were started without them.

Why this arrangement: the cluster, its job drivers and its workers are all processes of their own.
This test process runs the `ray` CLI and reads Ray's state API over plain HTTP, and never calls
ray.init or ray.util.state, so it shares a pytest session with the `ray_session` fixture in any
order. Two reasons: a process holds one Ray at a time, and Ray caches the first auth token a process
loads (after ray.util.state calls here with the cluster's token, the session's later ray.init failed
its own GCS's authentication). What ran where is checked from Ray's own records: the state API's
actors (/api/v0/actors, what list_actors reads) and their node_id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_batch.archive.discover import discover

import s3server
from localcluster import LocalCluster
from s3server import BUCKET

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(phantoms):
    with s3server.s3_server() as s3:
        archive = s3server.upload_tree(s3, phantoms, "archive")
        c = LocalCluster((3, 3)).start()
        try:
            yield c, s3, archive
        finally:
            c.stop()


def submit(cluster, script: str, *args: str, timeout: int = 480):
    """`ray job submit --working-dir . -- python jobs/<script> ...` exactly as a user types it."""
    c, s3, _ = cluster
    return c.cli("job", "submit", "--address", c.dashboard, "--working-dir", ".",
                 "--runtime-env-json", json.dumps({"env_vars": s3}), "--", "python", f"jobs/{script}", *args,
                 cwd=REPO, timeout=timeout)


def summary_of(p) -> dict:
    assert p.returncode == 0, f"job failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-3000:]}"
    lines = [line for line in p.stdout.splitlines() if line.startswith('{"summary"')]
    assert lines, p.stdout[-3000:]
    return json.loads(lines[-1])["summary"]


def actor_nodes(cluster, class_name: str) -> set[str]:
    actors = cluster[0].state("actors", class_name=class_name)
    assert actors, f"no {class_name} actors in Ray's records"
    return {a["node_id"] for a in actors}


@pytest.fixture(scope="module")
def trained(cluster):
    out = f"s3://{BUCKET}/runs/cluster"
    p = submit(cluster, "train.py", cluster[2], "--out", out, "--arch", "resnet18", "--weights", "none",
               "--image-size", "64", "--epochs", "1", "--workers", "2", "--placement", "STRICT_SPREAD",
               "--batch-size", "8")
    return out, p


def test_training_runs_one_worker_per_node_and_checkpoints_to_s3(cluster, trained):
    out, p = trained
    summary = summary_of(p)
    assert summary["epochs"] == 1 and summary["best_checkpoint"] == f"{out}/best.ckpt"
    assert "registered_as_default" not in summary  # a job joining a cluster does not register by default
    job_lines = p.stdout.splitlines()
    first = next(i for i, line in enumerate(job_lines) if line.startswith(("settings: {", '{"summary"')))
    assert job_lines[first].startswith("settings: {")  # the job's settings come before its summary
    keys = s3server.keys(cluster[1], "runs/cluster/")
    for name in ("last.ckpt", "best.ckpt", "history.json"):
        assert f"runs/cluster/{name}" in keys, keys
    assert len(actor_nodes(cluster, "RayTrainWorker")) == 2


def test_scoring_runs_model_actors_on_two_nodes(cluster, trained, phantoms):
    _, s3, archive = cluster
    out = f"s3://{BUCKET}/scores/cluster"
    # 2 actors x 2 CPUs on nodes of 3 CPUs: no node can hold both, whatever the scheduler does, and
    # each keeps 1 CPU for the decode and finish tasks.
    summary = summary_of(submit(cluster, "score.py", f"{archive}/test", "--out", out,
                                "--model", summary_of(trained[1])["best_checkpoint"], "--actors", "2",
                                "--cpus-per-actor", "2", "--batch-size", "4", "--stall-timeout", "180"))
    assert summary["plan"]["actors"] == 2 and summary["scored"] == 16 and summary["errors"] == 0
    table, _ = s3server.read_parquet_folder(s3, "scores/cluster")
    assert sorted(table.column("path").to_pylist()) == [e.path for e in discover(str(phantoms / "test"))]
    assert len(actor_nodes(cluster, "MapWorker(MapBatches(Scorer))")) == 2


def test_multi_node_training_refuses_a_node_local_out(cluster, tmp_path):
    p = submit(cluster, "train.py", cluster[2], "--out", str(tmp_path / "run"), "--arch", "resnet18",
               "--weights", "none", "--image-size", "64", "--epochs", "1", timeout=240)
    assert p.returncode != 0
    assert "is a node-local path, but the Ray cluster has 2 nodes" in p.stdout + p.stderr
    assert "s3://" in p.stdout + p.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("where", ["archive", "cam-dir"])
def test_multi_node_scoring_refuses_node_local_paths(cluster, tmp_path, where):
    local = tmp_path / where
    local.mkdir()
    args = [str(local), "--out", f"s3://{BUCKET}/scores/refused"] if where == "archive" else \
        [f"{cluster[2]}/test", "--out", f"s3://{BUCKET}/scores/refused", "--cam-dir", str(local)]
    p = submit(cluster, "score.py", *args, "--model", "resnet18:none", timeout=240)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    name = "ARCHIVE" if where == "archive" else "--cam-dir"
    assert f"{name} {local} is a node-local path, but the Ray cluster has 2 nodes" in text, text[-3000:]
    assert "CXR_BATCH_SHARED_FS=1" in text
    assert not s3server.keys(cluster[1], "scores/refused")  # refused before anything was written


def test_the_job_api_refuses_a_cli_without_token_auth(cluster):
    import subprocess

    from localcluster import RAY

    c = cluster[0]
    env = {k: v for k, v in c.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    p = subprocess.run([RAY, "job", "list", "--address", c.dashboard], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "token" in (p.stdout + p.stderr).lower()
    assert c.cli("job", "list", "--address", c.dashboard).returncode == 0  # with RAY_AUTH_MODE=token
