"""The latency benchmark's prompts, as a user's chat messages.

``CHAT``: ordinary questions, as one person chatting. ``REPEATING``: requests whose answer
repeats much of the prompt (a rewrite with one change, a correction, a summary of a text), where
n-gram speculation finds its guesses in the context. Their inputs are long enough that the
first output tokens are still within the repeated part.
"""

from __future__ import annotations

CHAT = (
    "What is the capital of France, and what is it known for?",
    "Write a short poem about the sea at night.",
    "Explain in simple words why the sky is blue.",
    "Give me three tips for learning to play the guitar.",
)

_INVENTORY = '''\
class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        if count <= 0:
            raise ValueError("count must be positive")
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count):
        if self.items.get(name, 0) < count:
            raise ValueError("not enough " + name)
        self.items[name] -= count
        if self.items[name] == 0:
            del self.items[name]

    def total(self):
        return sum(self.items.values())

    def report(self):
        lines = []
        for name in sorted(self.items):
            lines.append(name + ": " + str(self.items[name]))
        return "\\n".join(lines)
'''

_STATS = '''\
def mean(values):
    if not values:
        raise ValueError("no values")
    return sum(values) / len(values)


def variance(values):
    m = mean(values)
    return sum((v - m) ** 2 for v in values) / len(values)


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def describe(values):
    return {"mean": mean(values), "variance": variance(values), "median": median(values),
            "min": min(values), "max": max(values)}
'''

_LETTER = (
    "The town council met on Tuesday evening to discuss the new library. The building on "
    "Station Road will open in the spring, with a reading room on the first floor and a "
    "childrens corner on the ground floor. The council agreed to extend the opening hours "
    "on Saturdays until six o'clock, and to hold a book sale in the old hall every month. "
    "Volunteers are welcome to help with the move, which will take place over three "
    "weekends in March. Residents who still have books from the old library are asked to "
    "return them before the end of February, so that the catalogue can be completed in "
    "time for the opening."
)

REPEATING = (
    "Rewrite this Python code, renaming the method `total` to `count_all` and changing "
    f"nothing else. Reply with the full code only.\n\n```python\n{_INVENTORY}```",
    "Rewrite this Python code with one change: the function `mean` is renamed `average` "
    f"everywhere. Reply with the full code only.\n\n```python\n{_STATS}```",
    "Correct the spelling of 'childrens' in the following text and repeat the whole text "
    f"with that one correction:\n\n{_LETTER}",
    f"Summarise the following text, keeping its wording where you can:\n\n{_LETTER}",
)
