"""Generated text for the demo pipeline: an endless, learnable corpus with a real held-out split.

A shipped corpus of a few dozen paragraphs is memorised within a few steps, after which "held-out loss"
says nothing. These paragraphs are drawn from small grammars (arithmetic facts, scene descriptions,
step-by-step procedures) with regular structure a tiny model can learn, and item ``i`` depends only on
``(seed, i)``: a different seed (or index range) is a disjoint held-out set, as for the visual tasks.
"""

from __future__ import annotations

import numpy as np

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen twenty").split()
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
PLACES = ("left of", "right of", "above", "below", "next to")
ACTIONS = (("mix", "the flour and the water"), ("heat", "the pan"), ("cut", "the bread"),
           ("open", "the box"), ("read", "the letter"), ("fold", "the paper"), ("wash", "the cup"))


def _arithmetic(rng: np.random.Generator) -> str:
    lines = []
    for _ in range(rng.integers(2, 5)):
        a, b = (int(x) for x in rng.integers(0, 11, 2))
        if rng.random() < 0.5:
            lines.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}, so {a} + {b} = {a + b}.")
        else:
            a, b = max(a, b), min(a, b)
            lines.append(f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}, so {a} - {b} = {a - b}.")
    return " ".join(lines)


def _scene(rng: np.random.Generator) -> str:
    n = int(rng.integers(2, 5))
    objects = [(COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]) for _ in range(n)]
    parts = [f"The picture shows {NUMBERS[n]} shapes."]
    for (c1, s1), (c2, s2) in zip(objects, objects[1:]):
        parts.append(f"The {c1} {s1} is {PLACES[rng.integers(len(PLACES))]} the {c2} {s2}.")
    color = objects[0][0]
    count = sum(1 for c, _ in objects if c == color)
    parts.append(f"There {'is' if count == 1 else 'are'} {NUMBERS[count]} {color} "
                 f"shape{'' if count == 1 else 's'} in total.")
    return " ".join(parts)


def _procedure(rng: np.random.Generator) -> str:
    steps = rng.choice(len(ACTIONS), size=int(rng.integers(2, 5)), replace=False)
    words = ("First", "Then", "Next", "Finally")
    lines = [f"{words[min(k, 2) if k < len(steps) - 1 else 3]}, {ACTIONS[i][0]} {ACTIONS[i][1]}."
             for k, i in enumerate(steps)]
    return f"How to finish the task in {NUMBERS[len(steps)]} steps. " + " ".join(lines)


GRAMMARS = {"arithmetic": _arithmetic, "scenes": _scene, "procedures": _procedure}


class _IndexedGenerator:
    """Random access by index (grain ``RandomAccessDataSource``): item ``i`` is drawn from a generator seeded
    by ``(seed, start + i, salt)`` only, so any worker can produce any item in any order."""

    _salt = 0

    def __init__(self, seed: int = 0, length: int = 1_000_000, start: int = 0):
        self.seed, self.length, self.start = int(seed), int(length), int(start)

    def __len__(self) -> int:
        return self.length

    def _rng(self, i: int) -> np.random.Generator:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.start + int(i), self._salt]))


class SyntheticText(_IndexedGenerator):
    """Random-access ``{"text": paragraph}`` records; ``topics``: grammar name -> weight."""

    _salt = 7

    def __init__(self, topics: dict[str, float] | None = None, seed: int = 0, length: int = 1_000_000,
                 start: int = 0):
        topics = dict(topics) if topics else {name: 1.0 for name in GRAMMARS}
        unknown = set(topics) - set(GRAMMARS)
        if unknown:
            raise ValueError(f"unknown text topics {sorted(unknown)}; known: {sorted(GRAMMARS)}")
        self.names = sorted(n for n, w in topics.items() if w > 0)
        if not self.names:
            raise ValueError(f"text topic weights must have a positive entry, got {topics}")
        weights = np.array([topics[n] for n in self.names], float)
        self.probs = weights / weights.sum()
        super().__init__(seed, length, start)

    def __getitem__(self, i: int) -> dict:
        rng = self._rng(i)
        topic = self.names[int(rng.choice(len(self.names), p=self.probs))]
        paragraphs = [GRAMMARS[topic](rng) for _ in range(int(rng.integers(1, 3)))]
        return {"text": "\n".join(paragraphs)}


def _word_problem(rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, reasoning, answer) of a one- or two-step arithmetic word problem."""
    who = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fay")[rng.integers(6)]
    thing = ("apples", "stamps", "marbles", "books", "coins", "shells")[rng.integers(6)]
    a, b, c = (int(x) for x in rng.integers(1, 10, 3))
    if rng.random() < 0.5:
        question = f"{who} has {a} {thing} and finds {b} more. How many {thing} does {who} have now?"
        reasoning = f"{who} starts with {a}. Finding {b} more gives {a} + {b} = {a + b}."
        return question, reasoning, str(a + b)
    question = (f"{who} has {a} {thing}, gets {b} more, then gives away {min(c, a + b)}. "
                f"How many {thing} are left?")
    c = min(c, a + b)
    reasoning = f"First {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}."
    return question, reasoning, str(a + b - c)


class SyntheticReasoningChats(_IndexedGenerator):
    """Random-access SFT chats with a reasoning trace (``{"messages": [...]}``): arithmetic word problems
    whose assistant turn carries ``reasoning`` and a short final answer; item ``i`` depends on ``(seed, i)``."""

    _salt = 11

    def __getitem__(self, i: int) -> dict:
        rng = self._rng(i)
        question, reasoning, answer = _word_problem(rng)
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "reasoning": reasoning, "content": f"The answer is {answer}."}]}
