"""IMA's margins across torch.distributed ranks: :func:`merge` makes every rank's
:class:`~nnunet_ima.margins.MarginStore` identical (``store.merge()`` calls it).

Each rank contributes the entries it updated since the last merge; an id updated on several ranks
gets the mean of their values, ids updated nowhere keep their (shared) value, ids first seen on any
rank are added everywhere, and every rank ends with one key order (rank 0's keys, then the new keys
of rank 1, ...), so that the raw arrays and ``state_dict()`` agree too, not only each id's margin.
"""
from __future__ import annotations


def merge(store, group=None) -> None:
    """All-gather the updated entries and apply them on every rank; a no-op when torch.distributed is
    not initialised. A collective call: every rank of ``group`` must make it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    keys, values = store.updated_entries()
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (keys, values, store.keys()), group=group)
    order = list(dict.fromkeys(k for _, _, ks in gathered for k in ks))
    store.adopt(order, mean_per_key(gathered))


def mean_per_key(gathered: list) -> dict:
    """``{key: mean of the values the ranks sent for it}`` from ``[(keys, values, all_keys), ...]``."""
    sums: dict = {}
    for keys, values, _ in gathered:
        for k, v in zip(keys, values):
            s = sums.setdefault(k, [0.0, 0])
            s[0] += v
            s[1] += 1
    return {k: s / n for k, (s, n) in sums.items()}
