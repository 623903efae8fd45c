"""One per-name seeding rule for every pass that draws random numbers.

A random choice made for one tensor or layer must not depend on which others were selected or on
the order they are visited in (the streamed and in-memory merge engines agree bit for bit; one
layer's adapter init does not change when another layer is added to the selector). So each draw
gets its own seed, derived from the statement's seed and a name.
"""

from __future__ import annotations

import zlib

_MIX = 1_000_003  # a prime: spreads consecutive statement seeds apart before the name is added


def name_seed(seed: int, *key: object) -> int:
    """The seed for ``key`` (parts joined with ':') under the statement seed ``seed``."""
    text = ":".join(str(k) for k in key)
    return (seed * _MIX + zlib.crc32(text.encode())) % (2 ** 63)


def name_generator(seed: int, *key: object):
    """A CPU ``torch.Generator`` seeded with :func:`name_seed`."""
    import torch

    return torch.Generator().manual_seed(name_seed(seed, *key))
