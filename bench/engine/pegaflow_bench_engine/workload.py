"""Prompts: random token ids from a seeded generator, so every run (and every process) agrees."""

from __future__ import annotations

import random


def random_prompt(rng: random.Random, tokens: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(tokens)]


def shared_prefix_requests(seed: int, requests: int, system_prompts: int, system_tokens: int, user_tokens: int,
                           vocab: int) -> list[list[int]]:
    """A chat-like workload: each request is one of ``system_prompts`` shared prefixes (chosen at
    random, so every engine sees every prefix) followed by a user part of its own."""
    rng = random.Random(seed)
    systems = [random_prompt(rng, system_tokens, vocab) for _ in range(system_prompts)]
    return [systems[rng.randrange(system_prompts)] + random_prompt(rng, user_tokens, vocab) for _ in range(requests)]
