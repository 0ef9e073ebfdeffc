"""cli.py and the three command lines: every flag of train.py, sample.py, eval.py and shapes.py has a help line that
ends with its default, the flags are grouped, and the dtype names have one spelling."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

import cli
import eval as evaluation
import sample
import shapes
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSERS = {"train.py": train.make_parser, "sample.py": sample.make_parser, "eval.py": evaluation.make_parser,
           "shapes.py": shapes.make_parser}


@pytest.mark.parametrize("prog", list(PARSERS))
def test_every_flag_has_help_and_its_default(prog):
    parser = PARSERS[prog]()
    formatter = cli.HelpFormatter(prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._get_help_string(action)
        assert action.help and len(action.help) > 8, (prog, action.option_strings)
        assert "default" in text, (prog, action.option_strings, text)
        assert "\n" not in action.help.strip(), (prog, action.option_strings)


@pytest.mark.parametrize("prog", ["train.py", "sample.py", "eval.py"])
def test_flags_are_grouped(prog):
    parser = PARSERS[prog]()
    groups = [g for g in parser._action_groups if g.title not in ("options", "optional arguments", "positional "
                                                                                                   "arguments")]
    assert len(groups) >= 3
    ungrouped = [a for g in parser._action_groups if g not in groups for a in g._group_actions
                 if not isinstance(a, argparse._HelpAction)]
    assert ungrouped == [], [a.option_strings for a in ungrouped]


def test_help_shows_defaults_as_a_user_reads_them():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for line in ("optimizer steps (default: 10000)", "samples per process per micro-step (default: 8)",
                 "(default: runs/train)", "keep an EMA copy of the ControlNet and export it (default: off)"):
        assert line in text, line


def test_dtype_names():
    assert cli.dtype_name("no") == "fp32"  # diffusers' spelling of fp32, kept as an alias
    assert {cli.dtype_name(n) for n in ("fp32", "bf16", "fp16")} == set(cli.DTYPES)
    assert cli.DTYPES["bf16"] is torch.bfloat16
    with pytest.raises(argparse.ArgumentTypeError):
        cli.dtype_name("fp64")
    assert train.parse_args(["--mixed-precision", "no"]).mixed_precision == "fp32"


def test_errors_are_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--mixed-precision", "fp64"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:") and "fp64" in err[0]
    with pytest.raises(SystemExit) as e:
        cli.fail("sample.py", cli.CLIError("a message\n  over two lines"))
    assert e.value.code == 2
    assert capsys.readouterr().err == "sample.py: error: a message over two lines\n"


def test_random_crop_needs_crop(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--random-crop"])
    assert "--resize crop" in capsys.readouterr().err
    assert train.parse_args(["--random-crop", "--resize", "crop"]).random_crop


def test_train_flags_without_weights_say_what_to_do():
    """No --weights hands the run to shapes.py, which has flags of its own: a train.py flag fails in one line that
    says so, before anything runs."""
    argv = [sys.executable, "train.py", "--control", "depth", "--max-steps", "5", "--out", "/nonexistent"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("shapes.py: error: unrecognized arguments: --max-steps 5") and "--weights" in lines[0]
