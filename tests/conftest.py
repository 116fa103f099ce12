"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the tests' tiny models run faster and steadier on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shard_entries(tmp_path_factory):
    """(4-shard entry, 1-shard entry) of one small synthetic KuaiRand release, prepared once
    for every module that streams shards (read-only: tests write their runs elsewhere)."""
    from rmtl.data.shards import prepare_sharded
    from rmtl.data.synth_kuairand import write_kuairand

    root = tmp_path_factory.mktemp("kr_shards")
    write_kuairand(root / "raw", users=150, items=400, seed=5)
    four = prepare_sharded(root / "raw", shards=4, cache_dir=root / "c4", workers=1)
    one = prepare_sharded(root / "raw", shards=1, cache_dir=root / "c1", workers=1)
    return four.path, one.path
