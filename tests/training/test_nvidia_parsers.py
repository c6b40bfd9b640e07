"""Our parsers against NVIDIA's, flag by flag.

``tests/fixtures/nvidia/flags.json`` records every action of NVIDIA's ``train.py`` and ``validate.py`` parsers,
built by running NVIDIA's own scripts (``tests/fixtures/nvidia/make_flags.py``; its docstring has the command).
For each recorded flag, ours (``train_parser`` for train.py, ``eval_parser`` for validate.py, which is our
evaluate.py) must

* accept every option string NVIDIA's accepts, and show it in ``--help``;
* parse a sample value of NVIDIA's type to the value NVIDIA's parser gives (every one of NVIDIA's choices);
  a switch given alone must switch on (store_true) or off (store_false) as NVIDIA's;
* have NVIDIA's default.

Every exception is one entry of ``DIFFERENCES``, with the reason. A ``default`` difference must also be said in
the README's generated table (the flag's note names NVIDIA's default), so ``--help`` and the README state it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re

import pytest

from training.config import NOTES, SAME, eval_parser, train_parser

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "nvidia" / "flags.json"
NVIDIA = json.loads(FIXTURE.read_text())
PARSERS = {"train.py": train_parser, "validate.py": eval_parser}

# (script, flag, what) -> why ours differs from NVIDIA's there. what: "default" (said in the flag's note),
# "unset" (ours None where NVIDIA's '' / False / [] means the same: nothing given), "required", "value" (the
# parsed value has another form), "choices" (NVIDIA's takes any string, ours only the names that work).
DIFFERENCES = {
    ("train.py", "data", "required"): "optional: without it, --train-ann/--val-ann or the built-in synthetic set",
    ("validate.py", "data", "required"): "optional: without it, --val-ann, the checkpoint's val set or the "
                                         "built-in set",
    # defaults that change what runs (each named in the flag's note)
    ("train.py", "--model", "default"): "efficientdet_d0: every NVIDIA training script passes d0",
    ("validate.py", "--model", "default"): "the model the checkpoint records (ours do); NVIDIA's needs --model",
    ("train.py", "--fill-color", "default"): "mean, as NVIDIA's validate.py: padding is ~0 after normalization",
    ("train.py", "--batch-size", "default"): "unset = recipe; NVIDIA's recipe keeps 32",
    ("train.py", "--opt", "default"): "unset = recipe; NVIDIA's recipe keeps momentum",
    ("train.py", "--opt-eps", "default"): "unset = recipe; NVIDIA's recipe keeps 1e-3",
    ("train.py", "--weight-decay", "default"): "unset = recipe; NVIDIA's recipe keeps 4e-5",
    ("train.py", "--lr", "default"): "unset = recipe; NVIDIA's recipe keeps 0.01",
    ("train.py", "--epochs", "default"): "unset = recipe; NVIDIA's recipe keeps 300",
    ("train.py", "--warmup-epochs", "default"): "unset = recipe; NVIDIA's recipe keeps 5",
    ("train.py", "--model-ema", "default"): "unset = recipe; NVIDIA's recipe keeps it off",
    ("train.py", "--model-ema-decay", "default"): "unset = recipe; NVIDIA's recipe keeps 0.9998",
    ("train.py", "--memory-format", "default"): "unset = recipe; NVIDIA's recipe keeps nchw",
    ("train.py", "--cooldown-epochs", "default"): "--epochs N trains N epochs (NVIDIA's 300 trains 310)",
    ("train.py", "--train-interpolation", "default"): "bilinear: the filter NVIDIA's 'random' resizes with",
    ("train.py", "--log-interval", "default"): "unset = recipe; NVIDIA's recipe keeps 50, the small-data one "
                                               "logs every 10 steps as its epochs are a few dozen steps",
    ("train.py", "--benchmark-steps", "default"): "20 measured steps (NVIDIA's 0 measures one)",
    ("train.py", "--dllogger-file", "default"): "no dllogger file unless asked: log.jsonl has every event",
    ("validate.py", "--dllogger-file", "default"): "no dllogger file unless asked: eval.jsonl has the result",
    ("train.py", "--workers", "default"): "fitted to the CPU cores, so a small machine is not oversubscribed",
    ("validate.py", "--workers", "default"): "fitted to the CPU cores, so a small machine is not oversubscribed",
    ("train.py", "--output", "default"): "output, NVIDIA's folder for '' (its files go to output/train/)",
    ("train.py", "--remove-weights", "default"): "None: given with no names, ours re-initializes the class head",
    ("validate.py", "--batch-size", "default"): "8, what NVIDIA's scripts pass (128 needs a large GPU)",
    ("validate.py", "--checkpoint", "default"): "unset = OUTPUT/best.pth, else last.pth (NVIDIA: '', no weights)",
    ("validate.py", "--results", "default"): "OUTPUT/detections.json, next to the run's other files",
    # None where NVIDIA's falsy default means the same
    ("train.py", "--pretrained-backbone-path", "unset"): "None = no backbone file, as NVIDIA's ''",
    ("train.py", "--initial-checkpoint", "unset"): "None = no checkpoint, as NVIDIA's ''",
    ("train.py", "--resume", "unset"): "None = start fresh, as NVIDIA's False (ours also takes a path)",
    ("train.py", "--amp", "unset"): "None = fp32, as NVIDIA's False (ours also takes bf16)",
    ("validate.py", "--amp", "unset"): "None = fp32, as NVIDIA's False (ours also takes bf16)",
    ("train.py", "--freeze-layers", "unset"): "None = nothing frozen, as NVIDIA's []",
    ("validate.py", "--use-soft-nms", "unset"): "None = the model config's NMS, hard NMS for every EfficientDet, "
                                                "as NVIDIA's False",
    # the value's form
    ("train.py", "--input_size", "value"): "H [W]: a list; one number is NVIDIA's square size",
    ("validate.py", "--input_size", "value"): "H [W]: a list; one number is NVIDIA's square size",
    ("train.py", "--amp", "value"): "alone it is NVIDIA's switch (fp16); --amp bf16 also works",
    ("validate.py", "--amp", "value"): "alone it is NVIDIA's switch (fp16); --amp bf16 also works",
    ("train.py", "--resume", "value"): "alone it is NVIDIA's switch (OUTPUT/last.pth); --resume PATH also works",
    # names that do something (NVIDIA's take any string)
    ("train.py", "--sched", "choices"): "cosine (NVIDIA's only one: others fail an assert) and step",
    ("train.py", "--dist-bn", "choices"): "'', broadcast and reduce, the three NVIDIA's code acts on",
    ("train.py", "--interpolation", "choices"): "the names NVIDIA's _pil_interp resizes with (others: an error "
                                                "here, bilinear there)",
    ("train.py", "--train-interpolation", "choices"): "as --interpolation",
    ("validate.py", "--interpolation", "choices"): "as train.py's --interpolation",
    # the resize filter of a name (NVIDIA: data/transforms.py::_pil_interp, recorded in flags.json)
    ("*", "nearest", "filter"): "nearest resizes with the nearest filter here; NVIDIA's _pil_interp has no case for "
                                "it and resizes bilinear",
}

# Known gaps where ours should change: (test, script, flag) -> reason. Each is a strict xfail.
XFAIL: dict[tuple[str, str, str], str] = {}


def flag_name(action: dict) -> str:
    """The name a flag is known by here (NOTES, DIFFERENCES): its first long option, or the positional's dest."""
    opts = action["option_strings"]
    return next((o for o in opts if o.startswith("--")), opts[0]) if opts else action["dest"]


def cases(test: str, keep=lambda a: True):
    out = []
    for script in ("train.py", "validate.py"):
        for a in NVIDIA[script]:
            if a["action"] == "help" and test != "accepted" or not keep(a):
                continue
            name = flag_name(a)
            reason = XFAIL.get((test, script, name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(script, a, id=f"{script} {name}", marks=marks))
    return out


def ours(script: str, action: dict) -> argparse.Action:
    parser = PARSERS[script]()
    if not action["option_strings"]:
        return next(a for a in parser._actions if not a.option_strings and a.dest == action["dest"])
    return parser._option_string_actions[flag_name(action)]


def note(script: str, flag: str) -> str:
    return NOTES[script].get(flag, SAME)


def test_fixture_is_nvidias_parsers():
    assert "make_flags.py" in NVIDIA["made_by"] and "729963dd47e7c8bd462ad10bfac7a7b0b604e6dd" in NVIDIA["nvidia_source"]
    counts = {s: sum(a["action"] != "help" for a in NVIDIA[s]) for s in PARSERS}
    assert counts == {"train.py": 70, "validate.py": 30}, counts


@pytest.mark.parametrize("script, action", cases("accepted"))
def test_every_option_string_is_accepted_and_in_help(script, action):
    parser = PARSERS[script]()
    text = parser.format_help()
    if not action["option_strings"]:
        assert any(a.dest == action["dest"] and not a.option_strings for a in parser._actions)
    for opt in action["option_strings"]:
        assert opt in parser._option_string_actions, f"{script} does not accept {opt}"
        assert re.search(rf"(^|[\s\[,]){re.escape(opt)}([\s\],=]|$)", text, re.M), f"{opt} not in --help"


SAMPLES = {  # a value of each free-text flag that does something (others get "x")
    "model": "efficientdet_d0", "fill_color": "0", "opt": "momentum", "sched": "cosine", "dist_bn": "reduce",
    "eval_metric": "map", "anno": "val2017", "interpolation": "bicubic", "train_interpolation": "bicubic",
}


def samples(action: dict, tmp_path) -> list[list[str]]:
    """Command-line values to give the flag: one list of words per sample."""
    if action["dest"] == "config":
        path = tmp_path / "cfg.yaml"
        path.write_text("{}\n")
        return [[str(path)]]
    if action["choices"]:
        return [[str(c)] for c in action["choices"]]
    word = {"int": "3", "float": "0.25"}.get(action["type"], SAMPLES.get(action["dest"], "x"))
    if action["nargs"] == "+":
        return [[word, {"int": "5", "float": "0.75"}.get(action["type"], "y")]]
    if action["nargs"] == "*":
        return [[], ["class_net", "box_net"]]
    return [[word]]


def nvidia_value(action: dict, words: list[str]):
    convert = {"int": int, "float": float}.get(action["type"], str)
    return [convert(w) for w in words] if action["nargs"] in ("+", "*") else convert(words[0])


@pytest.mark.parametrize("script, action", cases("value"))
def test_a_sample_value_parses_as_nvidias(script, action, tmp_path):
    name, mine = flag_name(action), ours(script, action)
    assert mine.dest == action["dest"], f"{name} is stored as {mine.dest} (NVIDIA's code and args.yaml: {action['dest']})"
    other = DIFFERENCES.get((script, name, "value"))
    if action["nargs"] == 0:  # a switch: alone, it sets NVIDIA's constant
        got = getattr(PARSERS[script]().parse_args([name]), action["dest"])
        assert got == action["const"] or (other and bool(got) == action["const"]), (got, action["const"])
        return
    for words in samples(action, tmp_path):
        argv = [*words] if not action["option_strings"] else [name, *words]
        got = getattr(PARSERS[script]().parse_args(argv), action["dest"])
        want = nvidia_value(action, words)
        if other and mine.nargs == "+" and action["nargs"] is None:  # a list of NVIDIA's one value
            want = [want]
        assert got == want, (argv, got, want)
    if action["choices"] is None and mine.choices is not None:  # a narrowing must be listed
        assert (script, name, "choices") in DIFFERENCES, f"{name}: ours takes only {mine.choices}"


def shown(v) -> set[str]:
    """Ways a note may write NVIDIA's default ``v``."""
    if isinstance(v, bool):
        return {"on"} if v else {"off"}
    if v == "":
        return {"''"}
    if v == []:
        return {"nothing"}
    if isinstance(v, float):
        return {str(v), f"{v:g}", re.sub(r"e([+-])0*(\d)", lambda m: "e" + m[1].lstrip("+") + m[2], f"{v:.0e}")}
    return {str(v)}


@pytest.mark.parametrize("script, action", cases("default"))
def test_default_is_nvidias_or_a_listed_difference(script, action):
    name, mine = flag_name(action), ours(script, action)
    want, got = action["default"], mine.default
    if action["required"] != mine.required:
        assert (script, name, "required") in DIFFERENCES, f"{name}: required={mine.required}, NVIDIA's {action['required']}"
    if got == want and type(got) is type(want):
        assert not any((script, name, w) in DIFFERENCES for w in ("default", "unset")), f"{name}: stale entry"
        return
    if (script, name, "unset") in DIFFERENCES:
        assert got is None and not want, f"{name}: ours {got!r}, NVIDIA's {want!r}: not just unset"
        return
    assert (script, name, "default") in DIFFERENCES, f"{name}: default {got!r}, NVIDIA's {want!r}: not listed"
    said = note(script, name)
    assert said != SAME and "NVIDIA" in said, f"{name}: the README says 'as NVIDIA's' but the default differs"
    assert any(form in said for form in shown(want)), f"{name}: its note does not name NVIDIA's default {want!r}"
    assert said in mine.help, f"{name}: --help lacks the note"


@pytest.mark.parametrize("script, action", cases("exclusive", lambda a: a["mutually_exclusive_with"]))
def test_nvidias_mutually_exclusive_flags_are_here_too(script, action, capsys):
    """NVIDIA's add_bool_arg pairs (--redundant-bias / --no-redundant-bias): both at once is an error."""
    for other in action["mutually_exclusive_with"]:
        with pytest.raises(SystemExit) as exit:
            PARSERS[script]().parse_args([flag_name(action), other])
        assert exit.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_every_difference_is_one_that_exists():
    flags = {(s, flag_name(a)) for s in PARSERS for a in NVIDIA[s]}
    for script, name, what in DIFFERENCES:
        if what == "filter":
            assert name in NVIDIA["interpolation"], name
        else:
            assert (script, name) in flags, (script, name)
        assert what in ("default", "unset", "required", "value", "choices", "filter"), what


INTERPOLATION_FLAGS = [("train.py", "--interpolation"), ("train.py", "--train-interpolation"),
                       ("validate.py", "--interpolation")]


@pytest.mark.parametrize("script, flag", INTERPOLATION_FLAGS)
@pytest.mark.parametrize("name", sorted(NVIDIA["interpolation"]))
def test_interpolation_names_resize_as_nvidias(script, flag, name):
    """Every name NVIDIA's ``_pil_interp`` knows (and its defaults '' and random) is accepted and resizes with
    NVIDIA's filter, unless listed."""
    from datasets.transforms import resize_filter

    args = PARSERS[script]().parse_args([f"{flag}={name}"])
    assert getattr(args, flag.lstrip("-").replace("-", "_")) == name
    if ("*", name, "filter") not in DIFFERENCES:
        assert resize_filter(name).name == NVIDIA["interpolation"][name]
    else:
        assert resize_filter(name).name != NVIDIA["interpolation"][name]
        assert f"NVIDIA's: bilinear" in note(script, flag), "the note must say how NVIDIA resizes it"


def test_the_parsers_take_the_names_the_transforms_take():
    from datasets.transforms import INTERPOLATIONS
    from training.config import INTERPOLATIONS as names

    assert names == INTERPOLATIONS
    assert set(NVIDIA["interpolation"]) <= set(names)


@pytest.mark.parametrize("script, flag", INTERPOLATION_FLAGS)
def test_an_unknown_interpolation_is_one_line(script, flag, capsys):
    with pytest.raises(SystemExit) as exit:
        PARSERS[script]().parse_args([flag, "box"])
    assert exit.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# ---------------------------------------------------------------- train.py -c/--config FILE
def write(tmp_path, text: str, name="cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    cfg = write(tmp_path, "batch_size: 4\nmodel_ema: true\nlr_noise: [0.4, 0.9]\ninput_size: 256\n"
                          "opt_eps: 1e-3\namp: true\ntrain_interpolation: bicubic\n")
    a = train_parser().parse_args(["-c", cfg])
    assert (a.batch_size, a.model_ema, a.lr_noise, a.input_size, a.opt_eps, a.amp, a.train_interpolation) == \
        (4, True, [0.4, 0.9], [256], 1e-3, "fp16", "bicubic")
    a = train_parser().parse_args(["-b", "8", f"--config={cfg}", "--no-model-ema"])  # the command line wins
    assert (a.batch_size, a.model_ema, a.config) == (8, False, cfg)
    assert train_parser().parse_args([]).batch_size is None  # a file changes only the parser that read it


def test_nvidias_args_yaml_reads_back(tmp_path):
    """NVIDIA's train.py writes its parsed flags to OUTPUT/train/args.yaml (yaml.safe_dump of args.__dict__);
    that file, with NVIDIA's defaults, gives NVIDIA's values here (its switches --amp/--resume false = unset)."""
    import yaml

    from training.config import TrainConfig

    nv = {a["dest"]: a["default"] for a in NVIDIA["train.py"] if a["parser"] == "parser" and a["action"] != "help"}
    nv["data"] = str(tmp_path)
    args = train_parser().parse_args(["-c", write(tmp_path, yaml.safe_dump(nv, default_flow_style=False))])
    unset = {"resume", "amp", "remove_weights", "freeze_layers"}
    assert {k: getattr(args, k) for k in nv if k not in unset} == {k: v for k, v in nv.items() if k not in unset}
    assert all(getattr(args, k) is None for k in unset)
    cfg = TrainConfig.from_args(args, num_train=10_000, cuda=False)
    assert (cfg.model, cfg.lr, cfg.log_interval, cfg.cooldown_epochs) == ("tf_efficientdet_d1", 0.01, 50, 10)
    assert cfg.output == "output"  # NVIDIA's '' is its ./output (os.makedirs('') failed)


@pytest.mark.parametrize("text, said", [
    ("batch_size: 4\nbatch_sise: 8\n", "unknown key 'batch_sise'"),
    ("batch-size: 8\n", "did you mean batch_size?"),
    ("- batch_size\n- 4\n", "holds a list, not a mapping"),
    ("", "holds nothing"),
    ("batch_size: [4\n", "not valid YAML"),
    ("batch_size: four\n", "batch_size: 'four' is not an integer"),
    ("memory_format: nhcw\n", "is not one of 'nchw', 'nhwc'"),
    ("model_ema: 1\n", "is not true or false"),
    ("lr: [0.1, 0.2]\n", "is a list"),
    ("nproc: null\n", "nproc: None is null; the flag needs a value (its default: 1)"),
    ("clip_grad: -1\n", "clip_grad: -1 is out of range: it must be 0 or more (0: no clipping)"),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys, text, said):
    import train

    cfg = write(tmp_path, text)
    assert train.main(["-c", cfg, "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and f"({cfg}, --config)" in err[0], err


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    import train

    assert train.main(["--config", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read the config file" in err[0], err
    with pytest.raises(SystemExit):  # -c without its FILE: argparse's one line
        train_parser().parse_args(["-c"])


def test_without_pyyaml_config_says_how_to_install_it(tmp_path, monkeypatch):
    import builtins

    from training.errors import UserError

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "yaml" else real(name, *a, **k))
    with pytest.raises(UserError, match="PyYAML") as e:
        train_parser().parse_args(["-c", write(tmp_path, "batch_size: 4\n")])
    assert "pip install pyyaml" in e.value.todo
