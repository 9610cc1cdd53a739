"""Varied prompts for the greedy-equivalence tests: short, long, non-English, code, chat; and
random token-id prompts for the tiny random-weight models."""

import random

_HISTORY = (
    "The history of computing is a story of abstractions stacked upon abstractions. Early "
    "machines were programmed by rewiring panels; then came stored programs, assemblers, "
    "compilers, operating systems and networks. Each layer hid the one beneath it and let "
    "people think about larger problems. Memory management followed the same path: programs "
    "once addressed physical memory directly, until virtual memory and paging let every process "
    "believe it owned a large contiguous space while the hardware mapped fixed-size pages to "
    "whatever frames were free. "
)

LONG_PROMPT = (
    _HISTORY * 2
    + "Serving large language models raises a similar problem. Each request keeps a cache of "
    "keys and values for every token it has seen, and that cache grows as the model writes. "
    "Reserving the maximum length for every request wastes most of the memory; allocating it "
    "in fixed-size blocks, looked up through a table, wastes almost none. "
) * 3 + "In one sentence, the key idea of paged attention is"

PROMPTS: list[str] = [
    "Hello, my name is",
    "The capital of France is",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
    "Q: What is the boiling point of water at sea level?\nA:",
    "def fibonacci(n):\n    ",
    "#include <stdio.h>\n\nint main(void) {\n",
    "SELECT name, COUNT(*) FROM users",
    "import torch\n\nclass MLP(torch.nn.Module):\n    def __init__(self",
    "Bonjour, je m'appelle Marie et je",
    "Der schnelle braune Fuchs springt",
    "人工智能的未来是",
    "Привет! Как у тебя",
    "東京は日本の首都で、",
    "¿Cuál es la mejor manera de aprender",
    "Emoji story: 🚀🌕 The rocket",
    LONG_PROMPT,
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "A",
]


# The vocabulary of the tiny random-weight models: the first ids of the real tokenizer's. A
# 49152-row output projection would cost each of a tiny model's steps (and each of
# transformers' reference steps) most of its time, and test nothing the smaller one does not.
TINY_VOCAB = 4096
# SmolLM2's vocabulary: a tiny model that is fed text (its prompts encoded by the real tokenizer)
# takes this one.
TOKENIZER_VOCAB = 49152


def random_prompts(seed: int, count: int, longest: int) -> list[list[int]]:
    """``count`` prompts of 1 to ``longest`` token ids drawn from the tiny models' vocabulary
    (past SmolLM2's special tokens), the same for the same ``seed``."""
    gen = random.Random(seed)
    return [[gen.randrange(3, TINY_VOCAB) for _ in range(gen.randint(1, longest))]
            for _ in range(count)]
