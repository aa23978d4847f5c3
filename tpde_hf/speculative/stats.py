"""Counting what assisted generation did: rounds, drafted tokens, accepted tokens.

transformers does not report how many drafted tokens the verifier accepted. :func:`track` records
it by wrapping ``AssistedCandidateGenerator.update_candidate_strategy`` (called once per verification
round with the number of candidates and of matches) for the duration of a ``with`` block, then
restores it. For benchmarks and diagnostics; not thread-safe (the wrapper is class-wide).

Example::

    with track() as stats:
        model.generate(**enc, assistant_model=draft, do_sample=False, max_new_tokens=64)
    print(stats.acceptance, stats.tokens_per_round)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class SpeculationStats:
    """Per verification round: ``drafted[i]`` candidates proposed, ``accepted[i]`` of them accepted.

    Token-tree rounds (:mod:`~tpde_hf.speculative.tree`) also record ``leaf_hits[i]`` (1 when a leaf, a draft
    alternative, was accepted; it counts in ``accepted``) and ``rows[i]`` (drafted rows verified: chain and
    leaves); ``drafted`` counts the chain.
    """

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    leaf_hits: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.drafted)

    @property
    def acceptance(self) -> float:
        """Accepted drafted tokens / drafted tokens (nan when nothing was drafted)."""
        d = sum(self.drafted)
        return sum(self.accepted) / d if d else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Tokens the exact model emitted per verification forward (accepted + its own next token)."""
        return (sum(self.accepted) + self.rounds) / self.rounds if self.rounds else float("nan")

    def by_position(self) -> list[float]:
        """Probability that drafted token ``j`` (0-based) is accepted, among rounds that drafted at least ``j + 1``."""
        longest = max(self.drafted, default=0)
        chain = [a - h for a, h in zip(self.accepted, self.leaf_hits, strict=True)] if self.leaf_hits else self.accepted
        out = []
        for j in range(longest):
            n = sum(1 for d in self.drafted if d > j)
            a = sum(1 for d, acc in zip(self.drafted, chain, strict=True) if d > j and acc > j)
            out.append(a / n if n else float("nan"))
        return out

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": sum(self.drafted), "accepted": sum(self.accepted),
                "acceptance": self.acceptance, "tokens_per_round": self.tokens_per_round,
                "acceptance_by_position": self.by_position(), "leaf_hits": sum(self.leaf_hits),
                "rows": sum(self.rows)}

    def record_tree_round(self, chain: int, accepted: int, leaf: int, rows: int) -> None:
        """One token-tree round: ``chain`` drafted, ``accepted`` of them and ``leaf`` (0/1) leaves accepted."""
        self.drafted.append(chain)
        self.accepted.append(accepted + leaf)
        self.leaf_hits.append(leaf)
        self.rows.append(rows)


#: the trackers open now (token-tree generation reports its rounds to them)
_ACTIVE: list[SpeculationStats] = []


def record_tree_round(chain: int, accepted: int, leaf: int, rows: int) -> None:
    """Report a token-tree round to every open :func:`track` block."""
    for stats in _ACTIVE:
        stats.record_tree_round(chain, accepted, leaf, rows)


@contextlib.contextmanager
def track() -> Iterator[SpeculationStats]:
    """Record every assisted-generation round run inside the block (see the module docstring)."""
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    stats = SpeculationStats()
    original = AssistedCandidateGenerator.__dict__["update_candidate_strategy"]

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        stats.drafted.append(int(scores.shape[1]) - 1)
        stats.accepted.append(int(num_matches))
        return original(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.update_candidate_strategy = update_candidate_strategy
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        AssistedCandidateGenerator.update_candidate_strategy = original
        _ACTIVE.remove(stats)


__all__ = ["SpeculationStats", "record_tree_round", "track"]
