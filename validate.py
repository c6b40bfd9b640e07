#!/usr/bin/env python
"""NVIDIA's script name for ``evaluate.py``: ``python validate.py DATA --model efficientdet_d0 --checkpoint ...``
runs unchanged (see ``python validate.py --help``)."""
import sys

from evaluate import main

if __name__ == "__main__":
    sys.exit(main())
