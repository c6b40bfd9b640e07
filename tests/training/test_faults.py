"""Faults lose nothing: SIGKILL in the middle of an epoch, a failing worker of a distributed run, and a
checkpoint write interrupted at any point."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from datasets.synthetic import generate_synthetic
from detector import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(seed=11, num_train=4, num_val=2, image_size=64, num_classes=3, min_object=12, max_object=40, workers=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "tiny", **TINY)


def train_cmd(tiny, out, *extra, train_images=None):
    return [sys.executable, "train.py", "--train-ann", tiny["train"]["ann_file"],
            "--train-images", str(train_images or tiny["train"]["image_dir"]), "--val-ann", tiny["val"]["ann_file"],
            "--val-images", tiny["val"]["image_dir"], "--output", str(out), "--input_size", "128", "-b", "2",
            "--workers", "0", "--log-interval", "1", "--device", "cpu", "--pictures", "0", "--kernel-backend",
            "torch", "--eval-interval", "100", *extra]


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("EFFDET_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def train_events(out):
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            return [e for e in map(json.loads, f.read().splitlines()) if e["event"] == "train"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def weights(path):
    return ckpt.read(str(path))["model"]


def test_sigkill_mid_epoch_then_resume_equals_a_resume_from_the_same_checkpoint(tiny, tmp_path):
    out, twin = tmp_path / "killed", tmp_path / "twin"
    p = subprocess.Popen(train_cmd(tiny, out, "--epochs", "2"), cwd=ROOT, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        # kill -9 once epoch 1 has taken 1 of its 2 steps: last.pth (end of epoch 0) exists, epoch 1 is half done
        while not any(e["epoch"] == 1 for e in train_events(out)):
            assert p.poll() is None, p.stderr.read().decode()
            assert time.time() < deadline, "training did not reach epoch 1"
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL  # it was still running: killed mid-epoch
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    steps_done = max(e["step"] for e in train_events(out))
    state = ckpt.read(str(out / "last.pth"))  # the kill left a checkpoint that loads
    assert state["epoch"] == 0 and state["batch_in_epoch"] is None and state["step"] < steps_done
    twin.mkdir()
    shutil.copy(out / "last.pth", twin / "last.pth")
    for folder in (out, twin):  # the killed run resumed, and a run never killed resumed from the same file
        assert train.main(train_cmd(tiny, folder, "--epochs", "2", "--resume")[2:]) == 0
    a, b = weights(out / "last.pth"), weights(twin / "last.pth")
    assert ckpt.read(str(out / "last.pth"))["epoch"] == 1
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on the CPU
    assert any(not torch.equal(a[k], state["model"][k]) for k in a)  # and it did train on


def test_sigterm_to_the_process_group_saves_with_loader_workers(tiny, tmp_path):
    """``timeout``, SLURM and ``docker stop`` send SIGTERM to the whole process group, loader workers included:
    the run still finishes its step, saves a resumable last.pth and leaves no process behind."""
    out = tmp_path / "out"
    p = subprocess.Popen(train_cmd(tiny, out, "--epochs", "50", "--workers", "1"), cwd=ROOT, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not any(e["epoch"] >= 1 for e in train_events(out)):  # past the first epoch: workers are up
            assert p.poll() is None, p.stderr.read()
            assert time.time() < deadline, "training did not reach epoch 1"
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    assert "interrupted at epoch" in " ".join(stdout.split()), stdout[-2000:]
    state = ckpt.read(str(out / "last.pth"))
    assert state["step"] >= 2
    time.sleep(0.5)
    assert processes_in_group(p.pid) == []  # the loader worker went too


LOADER_AT_EXIT = """
import multiprocessing, sys, time
import torch
from datasets.loader import build_loader

class Items(torch.utils.data.Dataset):
    def __init__(self, hung):
        self.hung = hung

    def __len__(self):
        return 8

    def __getitem__(self, index_epoch):
        while self.hung and index_epoch[0] >= 2:  # the second batch never comes
            time.sleep(0.1)
        return index_epoch[0]

def main(case):
    loader = build_loader(Items(case != "bug"), 2, train=False, workers=1, seed=0)
    loader.collate_fn = list
    assert next(iter(loader)) == [0, 1]
    if case == "bug":  # the traceback keeps this frame, and with it the loader, alive at exit
        raise RuntimeError("a bug")

if __name__ == "__main__":
    if sys.argv[1] == "rank":  # in a process started as training.distributed starts a --nproc rank
        rank = multiprocessing.get_context("spawn").Process(target=main, args=("rank",))
        rank.start()
        rank.join()
        sys.exit(rank.exitcode)
    main(sys.argv[1])
"""


@pytest.mark.parametrize("case, status", [("bug", 1), ("hung", 0), ("rank", 0)])
def test_the_process_exits_with_loader_workers_left_at_exit(tmp_path, case, status):
    """Loader workers ignore SIGTERM (so that a SIGTERM to the group saves the run), and SIGTERM is also what
    Python's exit sends them before waiting for them: a crash with a loader still referenced, or a worker hung
    in its item (in the main process, or in a --nproc rank, which runs only multiprocessing's exit), left the
    process waiting forever at exit. Now it exits, with no process left."""
    (tmp_path / "at_exit.py").write_text(LOADER_AT_EXIT)
    p = subprocess.Popen([sys.executable, str(tmp_path / "at_exit.py"), case], cwd=ROOT,
                         env={**env(), "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        _, stderr = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: the process did not exit")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == status, stderr[-3000:]
    assert ("RuntimeError: a bug" in stderr) == (case == "bug") and "killed by signal" not in stderr, stderr[-3000:]
    time.sleep(0.5)
    assert processes_in_group(p.pid) == []


def processes_in_group(pgid: int) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(pid))
    return found


def test_failing_worker_of_a_distributed_run_exits_at_once_with_its_error_once(tiny, tmp_path):
    """--nproc 2 (gloo on the CPU); one training image is corrupt, so exactly one rank meets it while the other
    waits for it in a collective."""
    images = tmp_path / "images"
    shutil.copytree(tiny["train"]["image_dir"], images)
    bad = sorted(images.iterdir())[3]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    t0 = time.time()
    p = subprocess.Popen(train_cmd(tiny, tmp_path / "out", "--epochs", "2", "--nproc", "2", "-b", "1", "--sync-bn",
                                   train_images=images),  # BN over both ranks' images: batch 1 each at 128 px
                         cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    seconds = time.time() - t0
    assert p.returncode == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot decode image file") and str(bad) in lines[0], stderr
    assert "Traceback" not in stderr
    time.sleep(0.5)
    assert processes_in_group(p.pid) == []  # no orphan worker
    assert seconds < 200


def test_an_error_every_rank_meets_is_said_once_and_counts_the_ranks(tiny, tmp_path):
    """Each of --nproc 2 ranks printed the same line; and the batch check named the batch of one rank while
    a global batch is --batch-size on every rank (4 images, -b 3, 2 ranks: no batch, though 4 > 3)."""
    n = TINY["num_train"]
    p = subprocess.run(train_cmd(tiny, tmp_path / "out", "--nproc", "2", "-b", str(n // 2 + 1)), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert lines == [f"error: {n} training images are fewer than one batch of {n // 2 + 1} for each of 2 processes "
                     f"({2 * (n // 2 + 1)} images) ({tiny['train']['ann_file']}, --batch-size): pass a smaller "
                     "--batch-size, fewer --nproc or more images"], p.stderr


def test_a_worker_whose_peer_died_waits_to_be_killed_instead_of_printing(monkeypatch):
    """The race behind the test above: the healthy rank's collective fails as soon as the failed rank exits.
    Its traceback would follow the failed rank's one line unless ``spawn`` kills it first, so it waits."""
    from types import SimpleNamespace

    import training.distributed as D

    slept = []
    monkeypatch.setattr(D.os, "environ", dict(os.environ))  # _spawned sets RANK, WORLD_SIZE, ...
    monkeypatch.setattr(D.time, "sleep", slept.append)
    args = SimpleNamespace(debug=False)

    def fails(message):
        def fn(_):
            raise RuntimeError(message)
        return fn

    with pytest.raises(RuntimeError, match="closed by peer"):  # gloo's words, from a real run
        D._spawned(1, 2, 1, fails("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:55949. "
                                  "This is typically caused by a remote worker crashing."), args)
    assert slept == [D.PEER_LOST_GRACE_S]
    with pytest.raises(RuntimeError, match="ncclRemoteError"):  # NCCL's words, as PyTorch's error quotes them
        D._spawned(1, 2, 1, fails("NCCL error in: ProcessGroupNCCL.cpp:1983, remote process exited or there was a "
                                  "network error, NCCL version 2.20.5\nncclRemoteError: A call failed possibly due "
                                  "to a network error or a remote process exiting prematurely."), args)
    assert slept == [D.PEER_LOST_GRACE_S] * 2
    with pytest.raises(RuntimeError, match="out of memory"):  # the worker's own error: printed at once
        D._spawned(1, 2, 1, fails("CUDA error: out of memory"), args)
    assert slept == [D.PEER_LOST_GRACE_S] * 2

    def interrupted(seconds):  # a Ctrl-C during the wait ends it, with the collective's error alone
        raise KeyboardInterrupt

    monkeypatch.setattr(D.time, "sleep", interrupted)
    with pytest.raises(RuntimeError, match="reset by peer") as caught:
        D._spawned(1, 2, 1, fails("Connection reset by peer"), args)
    assert caught.value.__context__ is None  # no "During handling ... KeyboardInterrupt" in its traceback
    # a peer killed by a signal (the out-of-memory killer) printed nothing: the message says what happened
    from training.errors import WorkerFailed

    assert "killed by SIGKILL" in str(WorkerFailed(1, -9)) and "printed above" in str(WorkerFailed(1, 1))
    # a user error: rank 0 prints it at once, another rank after a wait in which ``spawn`` kills it when
    # rank 0 met the same error (the parent reports only the first failed worker)
    from training.errors import UserError

    def bad_input(_):
        raise UserError("bad input", "f.json", "field", "fix it")

    slept.clear()
    monkeypatch.setattr(D.time, "sleep", slept.append)
    for rank in (0, 1):
        with pytest.raises(SystemExit):
            D._spawned(rank, 2, 1, bad_input, args)
    assert slept == [D.SAME_ERROR_GRACE_S]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("cut", [0.0, 0.3, 0.999, "fsync", "replace"])
def test_interrupted_checkpoint_write_never_leaves_a_bad_last_pth(tmp_path, monkeypatch, cut):
    path = tmp_path / "last.pth"
    old = {"model": {"w": torch.arange(1000.0)}, "epoch": 3}
    ckpt.save(old, str(path))
    new = {"model": {"w": -torch.arange(1000.0)}, "epoch": 4}
    real_save, real_fsync, real_replace = torch.save, os.fsync, os.replace

    def partial_save(obj, f, *a, **k):  # write part of the bytes, then fail as a full disk or a kill would
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        f.write(data[: int(len(data) * cut)])
        raise Interrupted(f"interrupted after {int(len(data) * cut)} of {len(data)} bytes")

    def fail(*a, **k):
        raise Interrupted(cut)

    if cut == "fsync":
        monkeypatch.setattr(os, "fsync", fail)
    elif cut == "replace":
        monkeypatch.setattr(os, "replace", fail)
    else:
        monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(Interrupted):
        ckpt.save(new, str(path))
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "replace", real_replace)
    back = ckpt.read(str(path))  # still the previous complete checkpoint
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], old["model"]["w"])
    assert os.listdir(tmp_path) == ["last.pth"]  # no temporary file left behind
    ckpt.save(new, str(path))
    assert ckpt.read(str(path))["epoch"] == 4
