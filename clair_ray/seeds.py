"""Seed derivation: one root seed -> numpy SeedSequence -> a seed per (stream, trial, round, client).

Every random draw in a run is addressed by what it is for, never by the order in which work happens, so
actor count, batch layout and completion order cannot change any number.
"""

from __future__ import annotations

import numpy as np
import torch

# Streams keep unrelated draws independent even when their (trial, round, client) coincide.
PROBLEM = 0  # per trial: U, V̄, W_0, V_k, n_k
DATA = 1  # per (trial, client): X_k, noise, data contamination
ATTACK = 2  # per (trial, round, client): update attack randomness
SELECT = 3  # per trial: which clients are contaminated and with what
METHOD = 4  # per (trial, round): randomness inside aggregators
TRAIN = 5  # per (trial, round, client): randomness of local training (carried by every client call)
SAMPLE = 6  # per (trial, round): which clients take part in the round


def derive_seed(root: int, stream: int, trial: int = 0, round_: int = -1, client: int = -1) -> int:
    """A 63-bit seed for one (stream, trial, round, client) address.

    Args:
        root: The experiment's root seed.
        stream: One of the stream constants above.
        trial: Trial index.
        round_: Round index (-1: not round-specific).
        client: Client id (-1: not client-specific).

    Returns:
        A non-negative int usable by numpy and torch.
    """
    ss = np.random.SeedSequence(entropy=root, spawn_key=(stream, trial, round_ + 1, client + 1))
    return int(ss.generate_state(1, np.uint64)[0] & np.uint64(2**63 - 1))


def torch_generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def sample_clients(root: int, trial: int, round_: int, K: int, n: int) -> list[int]:
    """The clients that take part in a round: a seeded sample of ``n`` of ``K`` (all when n is 0 or >= K).

    A function of (root, trial, round) only, so actor count, batch layout and completion order cannot
    change it, and a resumed run draws the same sample.

    Args:
        root: The experiment's root seed.
        trial: Trial index.
        round_: Round index.
        K: Clients in the federation.
        n: Clients per round (``workload.clients_per_round``; 0: all).

    Returns:
        The sampled client ids, sorted.
    """
    if n <= 0 or n >= K:
        return list(range(K))
    rng = np.random.default_rng(derive_seed(root, SAMPLE, trial, round_))
    return sorted(int(k) for k in rng.choice(K, size=n, replace=False))
