"""The scripts' argument parser: exact option names, defaults in ``--help``, "did you mean" for a typo.

argparse accepts any unambiguous prefix of an option (``--learning_rat`` is taken as ``--learning_rate``),
so a typo can train with a value the user did not mean to set, and a later option that shares the prefix
silently changes what an old command line means. Option names here must match exactly; an unknown one stops
the run with the closest known names.
"""
import argparse
import difflib
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (module docstrings hold command examples) and "(default: X)" after each help text,
    unless the text already speaks of its default or there is nothing to show (unset, off, empty)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if text == argparse.SUPPRESS or "default" in text.lower():
            return text
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default in ("", [], ()):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return (text + " " if text else "") + "(default: %(default)s)"


def suggest_options(parser: argparse.ArgumentParser, word: str, n: int = 3):
    """The parser's option names closest to ``word`` (``--name=value`` is compared by its name)."""
    name = word.split("=", 1)[0]
    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    return difflib.get_close_matches(name, known, n=n, cutoff=0.6)


def unrecognized_message(parser: argparse.ArgumentParser, extras) -> str:
    """argparse's "unrecognized arguments: ..." with the closest option names of each unknown option."""
    message = "unrecognized arguments: " + " ".join(extras)
    hints = []
    for word in extras:
        if word.startswith("--"):
            close = suggest_options(parser, word)
            if close:
                hints.append(f"{word.split('=', 1)[0]}: did you mean {' or '.join(close)}?")
    return message + ("" if not hints else " (" + "; ".join(hints) + ")")


def unknown_options(parser: argparse.ArgumentParser, argv):
    """The ``--name`` / ``--name=value`` words of ``argv`` (up to a bare ``--``) that name no option."""
    known = {s for action in parser._actions for s in action.option_strings}
    unknown = []
    for word in argv:
        if word == "--":
            break
        if word.startswith("--") and word.split("=", 1)[0] not in known:
            unknown.append(word)
    return unknown


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``allow_abbrev=False``, ``HelpFormatter`` and a suggestion for each
    unknown option; exits with status 2 as argparse does."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        # unknown options first: a mistyped required option would otherwise be reported as missing
        unknown = unknown_options(self, argv)
        if unknown:
            self.error(unrecognized_message(self, unknown))
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            self.error(unrecognized_message(self, extras))
        return parsed


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` raise ``UserError`` (printed by ``run_main`` as one line) instead of printing its usage
    and exiting, as the other user errors of the scripts."""
    from library.device_utils import UserError

    def error(message):
        raise UserError(f"{parser.prog}: {message} (see --help)")

    parser.error = error
    return parser
