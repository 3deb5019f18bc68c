"""Built-in verifiable task, the tokenizer made in code, and reward loading for `softpo train`.

The built-in task must be learnable by RL from a randomly initialized model in minutes on a CPU, so
its reward has signal from the first step: partial credit per position, not all-or-nothing.

count: the prompt is a run of 1 to 4 consecutive digits counting up modulo 10 ("7", "456", "8901");
the completion should continue the run for 4 more digits and stop ("8901", "7890", "2345"). The
reward is the mean of two partial credits, each over the longer of 4 and the completion's length:
- answer: the positions where the completion matches the answer;
- counting: the steps that count up by one, where a character earns credit when it is the digit one
  more (mod 10) than the character before it (the prompt's last digit, for the first), so a slip
  costs its own step and not the rest.
Only the exact answer scores 1, extra characters cost credit, and random digits earn about 0.1 per
position from the first step on. The counting credit alone would pay 0.75 for a constant "5678"
whatever the prompt, a trap that RL from scratch can fall into; the answer credit halves that.

A reward function takes the prompts and the completions (decoded text, special tokens removed) and
returns one float per completion; `--reward module:function` loads any function with that signature.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from typing import Callable

RewardFn = Callable[[list[str], list[str]], list[float]]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Digits plus a few symbols so that custom prompts can say a little more than digits.
CHARACTERS = "0123456789 +-=:,."
ANSWER_LENGTH = 4


def make_tokenizer():
    """A character-level `PreTrainedTokenizerFast` built in code: one token per character.

    Left padding, because generation appends to the right of a batch of prompts.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def count_prompt(rng: random.Random) -> str:
    start, length = rng.randrange(10), rng.randint(1, 4)
    return "".join(str((start + i) % 10) for i in range(length))


def count_answer(prompt: str) -> str:
    last = int(prompt.strip()[-1])
    return "".join(str((last + i) % 10) for i in range(1, ANSWER_LENGTH + 1))


def answer_credit(answer: str, completion: str) -> float:
    """Positions where the completion matches the answer, over the longer of the two."""
    matches = sum(a == c for a, c in zip(answer, completion))
    return matches / max(len(answer), len(completion), 1)


def counting_credit(prompt: str, completion: str) -> float:
    """Steps that count up by one, over the longer of ANSWER_LENGTH and len(completion)."""
    previous = int(prompt.strip()[-1])
    credited = 0
    for character in completion[:ANSWER_LENGTH]:
        digit = int(character) if character.isdigit() else None
        credited += previous is not None and digit == (previous + 1) % 10
        previous = digit
    return credited / max(ANSWER_LENGTH, len(completion))


def count_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward of the count task in [0, 1] with partial credit (see the module docstring)."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}"
        )
    return [
        (answer_credit(count_answer(p), c.strip()) + counting_credit(p, c.strip())) / 2
        for p, c in zip(prompts, completions)
    ]


@dataclass(frozen=True)
class Task:
    name: str
    sample_prompt: Callable[[random.Random], str]
    reward: RewardFn
    max_new_tokens: int


TASKS = {"count": Task("count", count_prompt, count_reward, max_new_tokens=ANSWER_LENGTH + 2)}


def load_reward(spec: str) -> RewardFn:
    """`module:function` -> the function; ValueError naming `reward` when it cannot be loaded."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"reward must look like module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward: cannot import module {module_name!r} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward: {module_name!r} has no function {function_name!r}")
    return function


def load_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a text file."""
    with open(path, encoding="utf-8") as handle:
        prompts = [line.rstrip("\n") for line in handle if line.strip()]
    if not prompts:
        raise ValueError(f"prompts: {path!r} holds no non-empty line")
    return prompts
