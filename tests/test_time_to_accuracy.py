"""bench/time_to_accuracy.py: forwards the arguments, reads only this run's eval events, records each point."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import time_to_accuracy as tta

ROOT = Path(__file__).resolve().parents[1]


def fake_train(events, rc=0):
    """A stand-in for run_train that appends ``events`` to the --output log, as train.py would."""
    seen = {}

    def run(cmd, timeout_minutes):
        seen["cmd"], seen["timeout"] = cmd, timeout_minutes
        log = Path(tta.output_dir(cmd[2:])) / "log.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            for e in events:
                f.write(json.dumps(e) + "\n")
            f.write('{"event": "eval", "AP": 0.9')  # a run killed mid-line: skipped, not an error
        return rc, False
    return run, seen


def test_curve_rows_come_from_this_runs_eval_events(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    old = {"event": "eval", "epoch": 9, "step": 90, "minutes": 9.0, "AP": 0.77, "AP50": 0.88}
    (out / "log.jsonl").write_text(json.dumps(old) + "\n")  # an earlier run in the same --output
    events = [{"event": "start", "args": {"recipe": "small-data"}, "train_images": 10, "val_images": 3},
              {"event": "train", "step": 1, "loss": 2.0},
              {"event": "eval", "epoch": 0, "step": 5, "minutes": 0.5, "AP": 0.125, "AP50": 0.25, "AR100": 0.3},
              {"event": "eval", "epoch": 1, "step": 10, "minutes": 1.25, "AP": 0.375, "AP50": 0.5}]
    run, seen = fake_train(events)
    monkeypatch.setattr(tta, "run_train", run)
    rc = tta.main(["--name", "toy", "--results-dir", str(tmp_path / "res"), "--timeout-minutes", "3", "--",
                   "--eval-interval", "1", "--output", str(out)])
    assert rc == 0
    assert seen["cmd"][:2] == [sys.executable, str(ROOT / "train.py")]
    assert seen["cmd"][2:] == ["--eval-interval", "1", "--output", str(out)] and seen["timeout"] == 3.0
    text = capsys.readouterr().out
    assert "0.1250" in text and "0.3750" in text and "1.25" in text and "0.7700" not in text
    rows = [json.loads(line) for line in (tmp_path / "res" / "tta-toy.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["minutes"], r["AP"], r["AP50"]) for r in rows] == [(0, 0.5, 0.125, 0.25),
                                                                              (1, 1.25, 0.375, 0.5)]
    r = rows[0]
    assert r["name"] == "toy" and r["recipe"] == "small-data" and r["train_images"] == 10
    assert r["command"] == seen["cmd"][1:] and r["machine"]["cpu_cores"] >= 1 and r["machine"]["cpu"]
    assert r["git_commit"] and r["date"] and r["train_returncode"] == 0 and r["total_wall_minutes"] >= 0


def test_failed_run_without_evals_records_nothing_and_passes_the_status(tmp_path, monkeypatch, capsys):
    run, _ = fake_train([{"event": "start", "args": {}}], rc=3)
    monkeypatch.setattr(tta, "run_train", run)
    rc = tta.main(["--name", "bad", "--results-dir", str(tmp_path / "res"), "--", "--output=" + str(tmp_path / "o")])
    assert rc == 3 and not (tmp_path / "res").exists()
    assert "no eval events" in capsys.readouterr().err


def test_output_default_and_bad_names():
    assert tta.output_dir([]) == "output" and tta.output_dir(["--output", "a", "--output=b"]) == "b"
    for bad in (["--name", "a/b"], ["--name", "x", "--timeout-minutes", "0"], []):
        with pytest.raises(SystemExit):
            tta.main(bad + ["--", "--epochs", "1"])


def test_timeout_interrupts_the_run():
    t0 = time.perf_counter()
    rc, timed_out = tta.run_train([sys.executable, "-c", "import time; time.sleep(60)"], timeout_minutes=0.02)
    assert timed_out and rc != 0 and time.perf_counter() - t0 < 30  # SIGINT ends it well before 60 s
    rc, timed_out = tta.run_train([sys.executable, "-c", "raise SystemExit(4)"], timeout_minutes=1)
    assert (rc, timed_out) == (4, False)


@pytest.mark.slow  # about a minute on 2 CPU cores: two tiny epochs of train.py
def test_runs_train_py_on_a_tiny_glyphs_set(tmp_path):
    from datasets.synthetic import generate_synthetic

    g = generate_synthetic(tmp_path / "g", family="glyphs", num_train=4, num_val=2, image_size=96, min_object=10,
                           max_object=24, min_objects_per_image=2, max_objects_per_image=5, workers=1)
    cmd = [sys.executable, str(ROOT / "bench" / "time_to_accuracy.py"), "--name", "smoke", "--results-dir",
           str(tmp_path / "res"), "--", "--train-ann", g["train"]["ann_file"], "--train-images",
           g["train"]["image_dir"], "--val-ann", g["val"]["ann_file"], "--val-images", g["val"]["image_dir"],
           "--input_size", "128", "-b", "2", "--device", "cpu", "--epochs", "2", "--eval-interval", "1",
           "--output", str(tmp_path / "out")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "res" / "tta-smoke.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["minutes"] < rows[1]["minutes"]
    assert rows[0]["train_images"] == 4 and "time to accuracy: smoke" in p.stdout
