import itertools

from defend.data.sampler import ResumableSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ranks_split_each_epoch_into_disjoint_equal_parts():
    ranks = [take(ResumableSampler(10, seed=3, rank=r, world_size=3), 3) for r in range(3)]
    flat = [i for part in ranks for i in part]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))  # one sample left out, none twice


def test_a_resumed_sampler_continues_exactly_where_a_full_run_was():
    full = take(ResumableSampler(7, seed=1, rank=1, world_size=2), 20)  # crosses several epochs
    for start in (0, 2, 3, 7, 11):
        assert take(ResumableSampler(7, seed=1, rank=1, world_size=2, start=start), 20 - start) == full[start:]


def test_order_depends_on_seed_and_epoch_only():
    a, b = take(ResumableSampler(50, seed=0), 100), take(ResumableSampler(50, seed=0), 100)
    assert a == b and a[:50] != a[50:] and sorted(a[:50]) == list(range(50))
    assert take(ResumableSampler(50, seed=1), 50) != a[:50]
