"""A portable, fully specified random number generator for sampling (SplitMix64).

Every app (Swift, Kotlin, ArkTS, C++) must draw the same token from the same logits and seed, so the
generator is a few lines of 64-bit integer arithmetic that each language reproduces exactly
(spec and known outputs: docs/conformance.md):

    state  = seed mod 2**64
    next():  state = (state + 0x9E3779B97F4A7C15) mod 2**64
             z = state
             z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) mod 2**64
             z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) mod 2**64
             return z ^ (z >> 31)
    random(): (next() >> 11) * 2**-53          # a double in [0, 1), exact

`random()` has the name and meaning of numpy's `Generator.random()`, so `generation.draw` takes it
as its `rng`.
"""

from __future__ import annotations

import os

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
INV_2_53 = 1.0 / (1 << 53)


class SplitMix64:
    """SplitMix64 (Steele, Lea, Flood 2014). `seed=None` draws the seed from OS entropy."""

    def __init__(self, seed: int | None = 0) -> None:
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self.seed = int(seed) & MASK64
        self.state = self.seed

    def next_u64(self) -> int:
        self.state = (self.state + GOLDEN_GAMMA) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * MIX1) & MASK64
        z = ((z ^ (z >> 27)) * MIX2) & MASK64
        return z ^ (z >> 31)

    def random(self) -> float:
        """The top 53 bits of the next output as a double in [0, 1): (next_u64() >> 11) * 2**-53."""
        return (self.next_u64() >> 11) * INV_2_53
