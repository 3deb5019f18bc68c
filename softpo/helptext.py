"""The help text of every `softpo` subcommand: one formatter, so that each shows its defaults alike."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; an option's default appended to its help once, unless the help says it
    already or there is nothing to say (unset, or a switch: its default is only the switch's own)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        switch = action.nargs == 0
        if not action.option_strings or unset or switch or "default" in text:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"
