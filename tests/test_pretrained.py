"""--pretrained: fetch into a cache through a file:// URL (no network), hash-prefix check, clear errors."""
import hashlib
import os
import shutil

import pytest
import torch

from detector import pretrained as P
from detector.checkpoint import CheckpointError
from detector.model import create_model


def _publish(tmp_path, state: dict, stem: str = "tf_efficientdet_d0_34") -> str:
    """Save ``state`` as a release file named ``<stem>-<first 8 hex of its sha256>.pth``; its file:// URL."""
    src = tmp_path / "release"
    src.mkdir(exist_ok=True)
    raw = src / "raw.pth"
    torch.save(state, raw)
    prefix = hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
    final = src / f"{stem}-{prefix}.pth"
    os.replace(raw, final)
    return final.as_uri()


def test_urls_follow_the_hub_naming():
    assert set(P.PRETRAINED_URLS) >= {f"tf_efficientdet_d{i}" for i in range(8)} | {"tf_efficientdet_d7x"}
    for url in P.PRETRAINED_URLS.values():
        prefix = P.hash_prefix(url)
        assert prefix is not None and len(prefix) == 8
        m = torch.hub.HASH_REGEX.search(os.path.basename(url))  # torch hub reads the same prefix
        assert m.group(1) == prefix


def test_fetch_and_load_through_file_url(tmp_path):
    torch.manual_seed(0)
    published = create_model("tf_efficientdet_d0", image_size=128, backend="torch")
    url = _publish(tmp_path, published.state_dict())
    cache = tmp_path / "cache"
    torch.manual_seed(1)
    model = create_model("tf_efficientdet_d0", image_size=128, backend="torch")
    key = "class_net.predict.conv_pw.weight"
    assert not torch.equal(model.state_dict()[key], published.state_dict()[key])
    desc = P.load_pretrained(model, url=url, cache_dir=str(cache), progress=False)
    assert "plain state dict" in desc
    for k, v in published.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # second time from the cache: the release may be gone
    shutil.rmtree(tmp_path / "release")
    path = P.fetch(url=url, cache_dir=str(cache), progress=False)
    assert path == P.cache_path(url, str(cache)) and os.path.isfile(path)
    # another class count: everything but the class head is loaded
    other = create_model("tf_efficientdet_d0", num_classes=3, image_size=128, backend="torch")
    assert "class head re-initialized" in P.load_pretrained(other, url=url, cache_dir=str(cache), progress=False)
    k = "box_net.predict.conv_pw.weight"
    assert torch.equal(other.state_dict()[k], published.state_dict()[k])


def test_hash_mismatch_names_url_and_path(tmp_path):
    src = tmp_path / "tf_efficientdet_d0_34-00000000.pth"
    src.write_bytes(b"not the weights")
    with pytest.raises(P.PretrainedError) as e:
        P.fetch(url=src.as_uri(), cache_dir=str(tmp_path / "cache"), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and src.as_uri() in msg
    assert str(tmp_path / "cache" / src.name) in msg and "SHA-256" in msg
    assert isinstance(e.value, CheckpointError)


def test_offline_names_url_and_path(tmp_path):
    url = (tmp_path / "nowhere" / "tf_efficientdet_d0_34-f153e0cf.pth").as_uri()
    with pytest.raises(P.PretrainedError) as e:
        P.fetch(url=url, cache_dir=str(tmp_path / "cache"), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and str(tmp_path / "cache" / "tf_efficientdet_d0_34-f153e0cf.pth") in msg
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "cache").iterdir())


def test_file_placed_by_hand_is_checked(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tf_efficientdet_d0_34-f153e0cf.pth").write_bytes(b"truncated")
    with pytest.raises(P.PretrainedError, match="delete it"):
        P.fetch("tf_efficientdet_d0", cache_dir=str(cache), progress=False)


def test_unknown_name_and_cli(tmp_path, capsys):
    with pytest.raises(P.PretrainedError, match="no published weights for 'efficientdet_d5'"):
        P.weights_url("efficientdet_d5")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tf_efficientdet_d0_34-f153e0cf.pth").write_bytes(b"x")
    assert P.main(["tf_efficientdet_d0", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
