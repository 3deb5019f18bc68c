"""`softpo` command line: `softpo train ...`, `softpo bench ...` and `softpo compare ...`."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("softpo.train", "train a model with RL (built-in MoE task by default)"),
    "bench": ("softpo.bench", "run the microbenchmarks against the peers"),
    "compare": ("softpo.compare", "SAPO, GSPO, GRPO, GRPO+R2, SPO online and half-online, several seeds, recorded"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:8s} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("usage: softpo {train,bench,compare} [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"softpo: unknown command {command!r}; choose from {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module = __import__(COMMANDS[command][0], fromlist=["main"])
    return module.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
