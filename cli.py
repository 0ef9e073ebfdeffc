"""What train.py, sample.py and eval.py share on the command line: one-line errors, --help that shows every
default, and the names of the compute dtypes."""
import argparse
import sys

import torch

# The dtypes a user can name, one spelling each. "no" is the spelling of diffusers' and accelerate's
# --mixed_precision flag for fp32, kept as an alias so their commands carry over.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"no": "fp32"}


def dtype_name(text):
    """argparse type for a dtype flag: fp32, bf16 or fp16 (or the alias "no" for fp32)."""
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; use one of {', '.join(DTYPES)}")
    return name


class CLIError(Exception):
    """Bad input from the command line or a file it names: reported as one line, with a non-zero exit status."""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: the value, "off" for a switch, or "none" where nothing is used
    unless the flag is given (the help then says what happens without it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or not action.option_strings or "default" in text:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None:
            return f"{text} (default: none)"
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default)) or "none"
        return f"{text} (default: {default})"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and whose --help shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def fail(prog, error):
    """Exit with `prog: error: <the message on one line>` and status 2."""
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)
