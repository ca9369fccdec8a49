"""``newsformats.SeenKeys``: the compact set of record ids that ingest_news checks duplicates with."""

from __future__ import annotations


def test_seen_keys_agrees_with_a_set_across_runs_and_merges(monkeypatch):
    """Membership as a Python set answers it, through the pending set, many sorted runs and their
    merges (a tiny PENDING_KEYS forces them), including digests with leading / trailing zero bytes."""
    import random

    from pipeline_tasks.ingest.newsformats import SeenKeys

    monkeypatch.setattr(SeenKeys, "PENDING_KEYS", 7)
    monkeypatch.setattr(SeenKeys, "INITIAL_BLOOM_BITS", 64)  # rebuilt (doubled) several times below
    rng = random.Random(3)
    seen, reference = SeenKeys(), set()
    for step in range(3000):
        key = f"src:{rng.randrange(2500)}"
        assert (key in seen) == (key in reference), (step, key)
        if key not in reference:  # as ingest does: a seen id is quarantined, not added again
            seen.add(key)
            reference.add(key)
    assert len(seen) == len(reference)
    assert len(seen._bloom) * 8 >= len(seen) * SeenKeys.BLOOM_BITS_PER_KEY
    assert 1 < len(seen._runs) <= 12  # log-structured: few runs
    assert all(bytes(a) <= bytes(b) for run in seen._runs for a, b in zip(run, run[1:]))
    assert "src:unseen" not in seen and "" not in seen
