"""Published COCO weights by model name (``--pretrained``): fetch once into the torch hub cache, check, load.

The files are effdet's release assets (Ross Wightman's TF-ported weights for ``tf_efficientdet_d0..d7x``,
his own training for ``efficientdet_d0/d1``); the URLs are the ones effdet 0.4.1 lists in
``effdet/config/model_config.py``. Their key layout is ours, so :func:`detector.checkpoint.load` reads them
(``weights_only=True``) like any plain state dict.

Integrity: each file name ends in ``-<8 hex>.pth``, the first 8 hex digits of the file's SHA-256 (the torch
hub convention, ``torch.hub.HASH_REGEX``). The full hashes are not published, so the check is that prefix,
on download and again when the file is already in the cache (it may have been placed there by hand).

Offline, or when the hash does not match, :class:`PretrainedError` (a :class:`CheckpointError`) says in one
line which URL to download by hand and the exact path to put the file at.

    python -m detector.pretrained tf_efficientdet_d0      # download into the cache and print the path
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request

import torch

from .checkpoint import CheckpointError, error_line, load
from .model import EfficientDet

_RELEASE = "https://github.com/rwightman/efficientdet-pytorch/releases/download/v0.1/"
#: model name -> URL of its COCO weights (90 classes). Copied from effdet 0.4.1's model_config.py.
PRETRAINED_URLS = {
    "efficientdet_d0": _RELEASE + "efficientdet_d0-f3276ba8.pth",
    "efficientdet_d1": _RELEASE + "efficientdet_d1-bb7e98fe.pth",
    "tf_efficientdet_d0": _RELEASE + "tf_efficientdet_d0_34-f153e0cf.pth",
    "tf_efficientdet_d1": _RELEASE + "tf_efficientdet_d1_40-a30f94af.pth",
    "tf_efficientdet_d2": _RELEASE + "tf_efficientdet_d2_43-8107aa99.pth",
    "tf_efficientdet_d3": _RELEASE + "tf_efficientdet_d3_47-0b525f35.pth",
    "tf_efficientdet_d4": _RELEASE + "tf_efficientdet_d4_49-f56376d9.pth",
    "tf_efficientdet_d5": _RELEASE + "tf_efficientdet_d5_51-c79f9be6.pth",
    "tf_efficientdet_d6": _RELEASE + "tf_efficientdet_d6_52-4eda3773.pth",
    "tf_efficientdet_d7": _RELEASE + "tf_efficientdet_d7_53-6d1d7a95.pth",
    "tf_efficientdet_d7x": _RELEASE + "tf_efficientdet_d7x-f390b87c.pth",
}
PRETRAINED_CLASSES = 90  # COCO's 90 category-id slots, as effdet trains them

_HASH = re.compile(r"-([a-f0-9]+)\.")  # same pattern as torch.hub.HASH_REGEX


class PretrainedError(CheckpointError):
    pass


def weights_url(name: str) -> str:
    if name not in PRETRAINED_URLS:
        raise PretrainedError(f"no published weights for {name!r} (--pretrained): choose one of "
                              f"{', '.join(PRETRAINED_URLS)}, or pass --checkpoint FILE",
                              f"no published weights for {name!r}", None, "--pretrained",
                              f"pass --model one of {', '.join(PRETRAINED_URLS)}, or a weights file")
    return PRETRAINED_URLS[name]


def hash_prefix(url: str) -> str | None:
    """The SHA-256 prefix a torch-hub-style file name carries (``name-<hex>.pth``), or None."""
    m = _HASH.search(os.path.basename(urllib.parse.urlparse(url).path))
    return m.group(1) if m else None


def cache_path(url: str, cache_dir: str | None = None) -> str:
    """Where the file of ``url`` lives: ``<torch hub dir>/checkpoints/<file name>`` by default."""
    folder = cache_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    return os.path.join(folder, os.path.basename(urllib.parse.urlparse(url).path))


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str | None = None, url: str | None = None, cache_dir: str | None = None,
          progress: bool = True) -> str:
    """Path of the checked weights file of ``name`` (or of ``url``), downloaded into the cache if absent."""
    url = url or weights_url(name)
    path = cache_path(url, cache_dir)
    prefix = hash_prefix(url)
    by_hand = f"download {url} by hand and place it at {path}"
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.partial"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "effdet-triton"}),
                                        timeout=60) as r, open(tmp, "wb") as f:
                if progress:
                    print(f"downloading {url} to {path}", file=sys.stderr)
                shutil.copyfileobj(r, f, 1 << 20)
        except (urllib.error.URLError, OSError, ValueError) as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            reason = getattr(e, "reason", e)
            raise PretrainedError(f"could not download the weights ({reason}): {by_hand}",
                                  f"could not download the weights ({reason})", url, "--pretrained",
                                  by_hand) from None
        os.replace(tmp, path)  # only a complete file ever gets the final name
    if prefix is not None:
        digest = sha256_of(path)
        if not digest.startswith(prefix):
            raise PretrainedError(
                f"{path} has SHA-256 {digest[:16]}..., the file name promises {prefix}...: delete it, then "
                f"{by_hand}", f"weights file has SHA-256 {digest[:16]}..., its name promises {prefix}...", path,
                "--pretrained", f"delete it, then {by_hand}")
    return path


def load_pretrained(model: EfficientDet, name: str | None = None, url: str | None = None,
                    cache_dir: str | None = None, progress: bool = True) -> str:
    """Load the published COCO weights of ``name`` (default ``model.config.name``) into ``model``.

    With another class count than COCO's 90, the class head stays freshly initialized (fine-tuning).
    Returns :func:`detector.checkpoint.load`'s description.
    """
    path = fetch(name or model.config.name, url=url, cache_dir=cache_dir, progress=progress)
    return load(model, path, reset_class_head=model.config.num_classes != PRETRAINED_CLASSES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m detector.pretrained", description=__doc__.split("\n")[0])
    p.add_argument("model", choices=sorted(PRETRAINED_URLS))
    p.add_argument("--cache-dir", default=None, help="default: <torch hub dir>/checkpoints")
    args = p.parse_args(argv)
    try:
        print(fetch(args.model, cache_dir=args.cache_dir))
    except PretrainedError as e:
        if e.field == "--pretrained":  # this command's own argument
            e.field = "model"
        print(error_line(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
