"""No flag abbreviations, one-line flag errors; TrainConfig is filled once; the README table is generated."""
import pathlib

import pytest

from training.config import TrainConfig, markdown_flags, train_parser

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Each NVIDIA flag against NVIDIA's own parsers (accepted, in --help, value, default): test_nvidia_parsers.py


def test_no_abbreviations():
    args = train_parser().parse_args(["--drop", "0.2"])
    assert args.drop == 0.2 and args.drop_path is None  # --drop is NVIDIA's own flag, not --drop-path
    with pytest.raises(SystemExit):
        train_parser().parse_args(["--drop-p", "0.1"])
    assert train_parser().parse_args(["--worker", "3"]).workers == 3  # as NVIDIA's scripts spell it


@pytest.mark.parametrize("argv, flag", [(["--amp", "fp8"], "--amp"), (["-b", "x"], "--batch-size"),
                                        (["--epoch", "1"], "--epoch")])
def test_a_flag_argparse_cannot_read_is_one_line(capsys, argv, flag):
    """argparse printed its whole usage (48 lines for train.py) before the error."""
    with pytest.raises(SystemExit) as exit:
        train_parser().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and err[0].endswith(f"(-, {flag}): see python train.py --help"), err


def config(*argv, num_train=10, cuda=False):
    return TrainConfig.from_args(train_parser().parse_args(list(argv)), num_train=num_train, cuda=cuda)


def test_config_takes_the_recipe_for_unset_flags_only():
    small, coco = config(), config(num_train=10_000)
    assert small.opt == "adamw" and small.input_size == (128, 128) and "small-data" in small.recipe
    assert (coco.opt, coco.lr, coco.batch_size, coco.epochs, coco.warmup_epochs) == ("momentum", 0.01, 32, 300, 5)
    assert (small.opt_eps, coco.opt_eps) == (1e-8, 1e-3)  # NVIDIA's epsilon only in NVIDIA's recipe
    assert (small.log_interval, coco.log_interval, config("--log-interval", "7").log_interval) == (10, 50, 7)
    given = config("--lr", "0.3", "--input_size", "256", "--epochs", "2", "--opt-eps", "1e-3")
    assert (given.lr, given.input_size, given.epochs, given.opt, given.opt_eps) == (0.3, (256, 256), 2, "adamw", 1e-3)


def test_gpu_only_and_infrastructure_flags_say_what_they_do():
    cfg = config("--amp", "--fused-focal-loss", "--opt", "fusedmomentum", "--dllogger-file", "x.json",
                 "--no-prefetcher", "--dist-group-size", "4", "--mixup", "0.2")
    text = "\n".join(cfg.notes)
    assert cfg.amp is None and "--amp" in text and "--fused-focal-loss" in text
    assert "torch.optim.SGD(nesterov=False)" in text
    for flag in ("--dllogger-file", "--no-prefetcher", "--dist-group-size", "--mixup"):
        assert flag in text
    assert config().notes == ()
    on_gpu = config("--amp", "--fused-focal-loss", cuda=True)
    assert on_gpu.amp == "fp16" and on_gpu.kernel_backend == "triton" and on_gpu.notes == ()
    assert config("--amp", "bf16").amp == "bf16"


def test_bad_values_are_one_line_errors():
    assert config("--pretrained").pretrained and config("--pretrained").recipe == "NVIDIA COCO recipe"
    both = config("--pretrained", "--initial-checkpoint", "x.pth")  # NVIDIA's: the checkpoint replaces them
    assert not both.pretrained and any("--initial-checkpoint x.pth" in n for n in both.notes)
    with pytest.raises(ValueError, match="--fill-color"):
        config("--fill-color", "grey")
    with pytest.raises(ValueError, match="--opt"):
        config("--opt", "rmsprop")
    assert config("--fill-color", "0").fill_color == (0, 0, 0)


def test_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- nvidia-flags:start -->\n", "<!-- nvidia-flags:end -->"
    assert start in readme and end in readme, "README.md lost the NVIDIA flag table markers"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == markdown_flags(), "README table is stale: python -m training.config --markdown-flags"


def test_dllogger_file_takes_every_event_of_a_run(tmp_path):
    """--dllogger-file: NVIDIA's DLLL lines for every event a run writes, including the ones without an
    epoch (end, bn_frozen), which ended training runs in a KeyError."""
    import json

    from training.runlog import JsonLog

    log = JsonLog(str(tmp_path / "log.jsonl"), dllogger=str(tmp_path / "dll.json"))
    log.write(event="start", step=0, epoch=0, model="efficientdet_d0")
    log.write(event="train", step=5, epoch=1, loss=1.5)
    log.write(event="bn_frozen", step=7, fraction=0.2)
    log.write(event="end", step=9, minutes=0.5)
    log.write(event="eval", AP=0.5)  # evaluate.py on weights that record no training step: NVIDIA's ()
    log.write(event="eval", epoch=3, AP=0.5)  # NVIDIA's checkpoint: its epoch only
    lines = [json.loads(ln[len("DLLL "):]) for ln in (tmp_path / "dll.json").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == ["PARAMETER", [1, 5], [7], [9], [], [3]]
    assert lines[1]["data"] == {"event": "train", "loss": 1.5} and lines[3]["data"]["minutes"] == 0.5


def test_nvidia_switches_before_the_data_path_leave_it_positional(tmp_path):
    """NVIDIA's --amp and --resume are switches; here they take an optional value (bf16, a checkpoint file),
    which must not swallow the data root that follows them on NVIDIA's command lines."""
    from training.config import eval_parser, train_parser

    data = str(tmp_path)
    a = train_parser().parse_args(["--amp", data, "--model-ema"])
    assert (a.amp, a.data) == ("fp16", data)
    a = train_parser().parse_args(["--resume", data, "--amp", "bf16"])
    assert (a.resume, a.data, a.amp) == ("auto", data, "bf16")
    a = train_parser().parse_args([data, "--resume", "runs/x/last.pth", "--amp"])  # a file is a checkpoint
    assert (a.resume, a.data, a.amp) == ("runs/x/last.pth", data, "fp16")
    assert eval_parser().parse_args(["--amp", data]).data == data
    a = train_parser().parse_args(["--train-ann", "a.json", "--resume", data])  # a data flag names the data
    assert (a.resume, a.data) == (data, None)
    with pytest.raises(SystemExit):  # not a folder: --amp's value, checked as before
        train_parser().parse_args(["--amp", "fp32"])
