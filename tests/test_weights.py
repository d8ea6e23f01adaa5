"""ImageNet weights: found like torch.hub (URL, cache folder), sha256-checked, never unpickled.

Downloads cannot reach the internet here, so the "server" is a folder reached through file://
URLs: torch.hub's own download routine (urllib) reads them like https ones.
"""

import hashlib
import io
import os

import pytest
import torch

from cxr_batch.errors import CheckpointError, InputError
from cxr_batch.model import weights
from cxr_batch.model.network import build_model, torchvision_resnet
from cxr_batch.model.resnet import IMAGENET_URLS


class RunsCode:
    """Unpickling this creates a marker file: what a hostile weights file can do to torch.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _publish(server, stem: str, data: bytes, prefix: str | None = None) -> str:
    """Put ``data`` on the folder 'server' under torchvision's naming; -> its file:// URL."""
    prefix = prefix or hashlib.sha256(data).hexdigest()[:8]
    path = server / f"{stem}-{prefix}.pth"
    path.write_bytes(data)
    return path.as_uri()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache ($TORCH_HOME) and an empty download server."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "server").mkdir()
    return tmp_path


def test_weights_are_downloaded_into_the_hub_cache_checked_and_loaded(hub):
    state = torchvision_resnet("resnet18").state_dict()
    url = _publish(hub / "server", "resnet18", _torch_bytes(state))
    loaded = weights.imagenet_state(url)
    cached = hub / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    assert cached.exists() and weights.cache_path(url) == str(cached)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    os.remove(hub / "server" / os.path.basename(url))  # the second load comes from the cache alone
    assert torch.equal(weights.imagenet_state(url)["conv1.weight"], state["conv1.weight"])


def test_a_pickled_payload_is_refused_and_never_runs(hub):
    marker = hub / "pwned"
    payload = _torch_bytes({"conv1.weight": RunsCode(marker)})
    url = _publish(hub / "server", "resnet18", payload)  # its hash is right: only the unpickling is wrong
    with pytest.raises(CheckpointError, match="could run code"):
        weights.imagenet_state(url)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="could run code"):  # the same file given as --weights FILE
        build_model("resnet18", weights.cache_path(url))
    assert not marker.exists()
    torch.load(io.BytesIO(payload), weights_only=False)  # the payload is live: unpickled, it does run
    assert marker.exists()


def test_a_download_whose_hash_does_not_match_its_name_is_refused_and_not_kept(hub):
    url = _publish(hub / "server", "resnet18", _torch_bytes(torchvision_resnet("resnet18").state_dict()),
                   prefix="0badc0de")
    with pytest.raises(InputError, match="invalid hash"):
        weights.imagenet_state(url)
    cache = hub / "torch" / "hub" / "checkpoints"
    assert not (cache / os.path.basename(url)).exists() and not list(cache.glob("*.partial"))


def test_a_cached_file_that_changed_after_download_is_refused(hub):
    url = _publish(hub / "server", "resnet18", _torch_bytes(torchvision_resnet("resnet18").state_dict()))
    path = weights.fetch(url)
    with open(path, "r+b") as f:  # cut short, as by a full disk or a copy that was interrupted
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="name promises"):
        weights.imagenet_state(url)


def test_build_model_imagenet_checks_torchvisions_own_file_name(hub):
    """A file in the cache under torchvision's name (resnet18-f37072fd.pth) that is not that file is
    refused before torch.load sees it; nothing is downloaded since the file is there."""
    url = IMAGENET_URLS["resnet18"]
    os.makedirs(os.path.dirname(weights.cache_path(url)))
    with open(weights.cache_path(url), "wb") as f:
        f.write(_torch_bytes(torchvision_resnet("resnet18").state_dict()))
    with pytest.raises(CheckpointError, match=r"promises f37072fd"):
        build_model("resnet18", "imagenet")


def test_a_local_weights_file_without_a_hash_in_its_name_loads_unchecked(tmp_path):
    state = torchvision_resnet("resnet18").state_dict()
    path = tmp_path / "my_resnet18.pth"
    path.write_bytes(_torch_bytes(state))
    model = build_model("resnet18", str(path))
    assert torch.equal(model.trunk[0].weight, state["conv1.weight"])
    assert weights.hash_prefix("resnet-1.pth") is None and weights.hash_prefix("resnet101-cd907fc2.pth") == "cd907fc2"
