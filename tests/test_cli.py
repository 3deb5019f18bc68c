"""The `softpo` command line: --version, dispatch, and help text that shows each default once and ends with
examples in one torchrun style."""

import re

import pytest

import softpo
from softpo import cli
from softpo.train import compare, flags


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"softpo {softpo.__version__}\n"


def test_unknown_command_is_exit_2(capsys):
    assert cli.main(["nonsense"]) == 2
    assert "unknown command" in capsys.readouterr().err


def _option_helps(parser):
    formatter = parser.formatter_class(parser.prog)
    for action in parser._actions:
        if action.option_strings and action.nargs != 0:
            yield action, formatter._expand_help(action)


@pytest.mark.parametrize("parser", [flags.build_parser(), compare.build_parser()], ids=["train", "compare"])
def test_every_option_shows_its_default_once(parser):
    for action, text in _option_helps(parser):
        assert text.count("default") == 1, (action.option_strings, text)
        assert "(default: None)" not in text and "(default: [])" not in text, text
    shown = {action.dest: text for action, text in _option_helps(parser)}
    if parser.prog == "softpo train":
        assert "(default: 400)" in shown["steps"] and "(default: 0.001)" in shown["lr"]
        assert "(default: 0)" in shown["seed"]


@pytest.mark.parametrize("parser", [flags.build_parser(), compare.build_parser()], ids=["train", "compare"])
def test_help_ends_with_examples(parser):
    text = parser.format_help()
    examples = text[text.index("examples:"):].strip().splitlines()[1:]
    assert 2 <= len(examples) <= 3
    assert all(line.strip().startswith(("softpo ", "torchrun ")) for line in examples)


def test_one_torchrun_style():
    import softpo.train.loop as loop

    texts = [flags.EXAMPLES, cli.EXAMPLES, compare.EXAMPLES, loop.__doc__, softpo.train.__doc__]
    for text in texts:
        for line in re.findall(r"torchrun -[^\n]*", text):
            assert line.startswith("torchrun --nproc-per-node N -m softpo.train") or \
                re.match(r"torchrun --nproc-per-node \d+ -m softpo\.train", line), line


def test_no_jargon_in_user_facing_text():
    texts = [flags.build_parser().format_help(), compare.build_parser().format_help(), str(cli.COMMANDS)]
    for text in texts:
        assert not re.search(r"round ?2|issue \d|\bR[23]\b|\bS\d\b|seeds' comparison", text), text


def test_root_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS) and "--version" in out and "examples:" in out
