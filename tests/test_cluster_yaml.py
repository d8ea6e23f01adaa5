"""cluster.yaml passes Ray's own cluster-launcher validation, offline (no cloud calls), and says
what the README promises: a head that takes no work, GPU workers from zero, the pinned Ray."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))  # fills the keys left out from Ray's aws/defaults.yaml
    validate_config(config)
    return config


def test_validates_with_rays_schema(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validator_is_not_a_rubber_stamp(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["resources"]["CPU"] = 3.5  # Ray wants integers
    with pytest.raises(Exception, match="3.5"):
        validate_config(prepare_config(bad))


def test_head_takes_no_work_and_gpu_workers_scale_from_zero(prepared):
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] >= 1 and gpu["node_config"]["InstanceType"].startswith("g")


def test_every_node_installs_the_project_and_the_pinned_ray_never_a_nightly(prepared):
    pin = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = " ".join(prepared[key])
        assert f"ray[data,train,default]=={pin}" in commands and "~/cxr-batch" in commands, key
        assert "ray-wheels" not in commands and "dev0" not in commands, key
    assert "~/cxr-batch" in prepared["file_mounts"]


def test_token_auth_on_every_node(prepared):
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in prepared[key]), key
