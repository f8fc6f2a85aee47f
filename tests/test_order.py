"""An epoch's record order is a function of (seed, epoch) alone, and global batch b is the same
set of records however many workers split it (issue 18). No Ray, no torch."""

import numpy as np
import pytest

from ssl_platform.data.order import epoch_order, steps_per_epoch, worker_ids


@pytest.mark.parametrize("n, shard, window", [(1437, 64, 8), (1000, 7, 3), (5, 64, 8), (0, 64, 8), (130, 1, 1)])
def test_the_order_is_a_permutation_fixed_by_seed_and_epoch(n, shard, window):
    order = epoch_order(n, seed=3, epoch=2, shard_size=shard, window=window)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))
    assert np.array_equal(order, epoch_order(n, seed=3, epoch=2, shard_size=shard, window=window))


def test_epochs_and_seeds_give_different_orders():
    base = epoch_order(1437, seed=0, epoch=0)
    assert not np.array_equal(base, epoch_order(1437, seed=0, epoch=1))
    assert not np.array_equal(base, epoch_order(1437, seed=1, epoch=0))
    assert not np.array_equal(base, np.arange(1437))


def test_a_record_stays_within_its_window_of_shards():
    shard, window, n = 10, 4, 1000
    order = epoch_order(n, seed=5, epoch=1, shard_size=shard, window=window)
    span = shard * window  # positions a window of shards occupies (all shards are full here)
    for start in range(0, n, span):
        block = order[start:start + span]
        shards = np.unique(block // shard)
        assert len(shards) == window  # exactly the window's shards, mixed among themselves
        assert np.array_equal(np.sort(block), np.sort(np.concatenate([np.arange(s * shard, (s + 1) * shard)
                                                                      for s in shards])))
    # Records of one shard are spread over its window, not kept contiguous.
    assert not all(np.all(np.diff(order[i:i + shard]) == 1) for i in range(0, n, shard))


def test_global_batches_are_the_same_sets_on_1_2_and_4_workers():
    batch, n = 16, 1437
    order = epoch_order(n, seed=0, epoch=4)
    steps = steps_per_epoch(n, batch)
    by_world = {}
    for world in (1, 2, 4):
        lists = [worker_ids(order, batch, rank, world) for rank in range(world)]
        assert all(len(ids) == steps * batch // world for ids in lists)
        # global batch b: the union of every worker's b-th local batch
        by_world[world] = [set(np.concatenate([ids[b * batch // world:(b + 1) * batch // world] for ids in lists]))
                           for b in range(steps)]
        assert len(set().union(*by_world[world])) == steps * batch  # no record twice in an epoch
    assert by_world[1] == by_world[2] == by_world[4]


def test_a_worker_count_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(ValueError, match="batch_size=10 does not split into 4"):
        worker_ids(epoch_order(100, 0, 0), batch_size=10, rank=0, world=4)
