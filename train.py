#!/usr/bin/env python
"""Train EfficientDet. Flags follow NVIDIA's EfficientDet-PyTorch ``train.py``.

With no data flags it trains on the built-in synthetic data set (generated on first use), so
``python train.py`` shows the whole loop on any machine. Flags left unset take NVIDIA's COCO recipe, or,
for a training set under 5,000 images, the small-data recipe (``training/config.py``: SMALL_RECIPE).
The loop itself is ``training/loop.py``.
"""
import sys

from training.config import check_flag_ranges, check_image_flags, train_parser
from training.errors import run


def main(argv=None):
    """Bad input ends in one ``error: ...`` line and exit status 2 (``--debug``: the traceback)."""
    return run(_main, argv)


def _main(argv):
    args = train_parser().parse_args(argv)
    check_flag_ranges(args)
    check_image_flags(args)
    from training import distributed, loop
    from training.host import check_kernel_backend, uses_cuda

    # a --device or kernel backend this machine cannot run: one line now, not one per worker later
    check_kernel_backend(args.kernel_backend, uses_cuda(args.device))

    if args.nproc > 1:
        distributed.spawn(args.nproc, loop.train, args)
    else:
        loop.train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
