"""--pretrained: fetch into a cache through a file:// URL (no network), hash-prefix check, clear errors."""
import hashlib
import os
import re
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
    line = r"^error: weights file has SHA-256 .* \(.*tf_efficientdet_d0_34-f153e0cf\.pth, model\): delete it"
    assert re.match(line, err), err


@pytest.fixture
def published_d0(tmp_path, monkeypatch):
    """efficientdet_d0's 90-class weights published at a file:// URL, and an empty torch hub cache."""
    from datasets.synthetic import generate_synthetic

    torch.manual_seed(0)
    weights = create_model("efficientdet_d0", image_size=128, backend="torch").state_dict()
    monkeypatch.setitem(P.PRETRAINED_URLS, "efficientdet_d0", _publish(tmp_path, weights, "efficientdet_d0"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    data = generate_synthetic(tmp_path / "syn", seed=5, num_train=2, num_val=1, image_size=64, num_classes=3,
                              min_object=12, max_object=40, workers=1)
    return weights, data


def test_train_pretrained_loads_the_published_weights_by_name(published_d0, tmp_path):
    import train

    weights, data = published_d0
    out = tmp_path / "run"
    argv = ["--train-ann", data["train"]["ann_file"], "--train-images", data["train"]["image_dir"],
            "--model", "efficientdet_d0", "--pretrained", "--input_size", "128", "-b", "2", "--device", "cpu",
            "--lr", "1e-12", "--warmup-lr", "1e-12", "--max-steps", "1", "--output", str(out)]
    assert train.main(argv) == 0
    trained = torch.load(out / "last.pth", weights_only=True)["model"]
    fresh = create_model("efficientdet_d0", num_classes=3, image_size=128, backend="torch").state_dict()
    for k in ("backbone.conv_stem.weight", "box_net.predict.conv_pw.weight"):  # one step at lr 1e-12
        torch.testing.assert_close(trained[k], weights[k], rtol=0, atol=1e-6)
        assert not torch.allclose(fresh[k], weights[k], atol=1e-3), k  # the check could fail
    assert trained["class_net.predict.conv_pw.bias"].numel() == 9 * 3  # 3 classes: a fresh class head
    assert os.path.isfile(P.cache_path(P.PRETRAINED_URLS["efficientdet_d0"]))


def test_evaluate_pretrained_and_offline_error(published_d0, tmp_path, monkeypatch, capsys):
    import evaluate
    import train

    _, data = published_d0
    val = ["--val-ann", data["val"]["ann_file"], "--val-images", data["val"]["image_dir"], "--device", "cpu",
           "--input_size", "128", "--output", str(tmp_path / "ev")]
    assert evaluate.main(val + ["--model", "efficientdet_d0", "--pretrained"]) == 0
    import json

    event = [json.loads(x) for x in open(tmp_path / "ev" / "eval.jsonl")][-1]
    assert event["checkpoint"] == P.cache_path(P.PRETRAINED_URLS["efficientdet_d0"]) and "AP" in event
    capsys.readouterr()
    url = (tmp_path / "gone" / "efficientdet_d0-f3276ba8.pth").as_uri()
    monkeypatch.setitem(P.PRETRAINED_URLS, "efficientdet_d0", url)
    argv = ["--train-ann", data["train"]["ann_file"], "--train-images", data["train"]["image_dir"],
            "--model", "efficientdet_d0", "--pretrained", "--device", "cpu", "--output", str(tmp_path / "off")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and url in err[0], err
    assert P.cache_path(url) in err[0]
