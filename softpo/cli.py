"""`softpo` command line: `softpo train ...`, `softpo bench ...`, `softpo compare ...` and `softpo --version`."""

from __future__ import annotations

import importlib
import sys

# Each command is the `main(argv)` of its module.
COMMANDS = {
    "train": ("softpo.train", "train a model with RL (a small MoE on the built-in task by default)"),
    "bench": ("softpo.bench", "time softpo's losses against other implementations"),
    "compare": ("softpo.train.compare", "train SAPO, GSPO, GRPO (with and without routing replay) and SPO (fully "
                "and half online) from several seeds each, and tabulate the results"),
}
USAGE = "usage: softpo {train,bench,compare} [options]   (softpo COMMAND --help for a command's options)"
EXAMPLES = """examples:
  softpo train --steps 200 --out runs/sapo
  torchrun --nproc-per-node 2 -m softpo.train --loss grpo --beta 0.04
  softpo compare --quick --out /tmp/compare
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--version":
        import softpo

        print(f"softpo {softpo.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:8s} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print(f"{USAGE}\n\ncommands:\n" + "\n".join(lines) + "\n\noptions:\n  -h, --help  show this help\n"
              f"  --version   print softpo's version\n\n{EXAMPLES}", end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"softpo: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
