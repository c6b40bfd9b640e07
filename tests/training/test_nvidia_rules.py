"""Two rules of NVIDIA's train.py, recorded by running NVIDIA's own code (``tests/fixtures/nvidia/make_rules.py``):
when ``--eval-after`` lets an epoch be evaluated, and which parameters ``--remove-weights`` leaves fresh."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from detector.checkpoint import removed_keys
from training.loop import evaluation_due

RULES = json.loads((Path(__file__).parents[1] / "fixtures" / "nvidia" / "rules.json").read_text())


def test_eval_after_evaluates_the_epochs_nvidia_evaluates():
    cases = RULES["eval_after"]["cases [epoch, eval_after, evaluates]"]
    assert len(cases) == 25
    for epoch, after, nvidia in cases:  # NVIDIA (with EMA) evaluates every epoch past the threshold
        cfg = SimpleNamespace(eval_after=after, eval_interval=1)
        assert evaluation_due(cfg, epoch, is_last=False) == nvidia, (epoch, after)


@pytest.mark.parametrize("case", RULES["remove_weights"]["cases"], ids=lambda c: " ".join(c["remove"]))
def test_remove_weights_leaves_fresh_what_nvidia_leaves_fresh(case):
    assert sorted(removed_keys(RULES["remove_weights"]["keys"], case["remove"])) == case["fresh"]
