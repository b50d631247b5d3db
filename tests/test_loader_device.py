"""BatchLoader on any device and under DDP: per-rank shards, resuming mid-epoch, epoch-wide augmentation draws."""

import pytest
import torch

from kdistill.data import Augment, BatchLoader, ImageSet
from kdistill.errors import KdistillError

AUGMENT = Augment(crop_padding=2, hflip=True)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fake_set(n: int = 23, channels: int = 2, size: int = 6) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g),
                    torch.randint(0, 10, (n,), generator=g))


def loader(data: ImageSet, batch_size: int = 8, **kwargs) -> BatchLoader:
    return BatchLoader(data, batch_size, mean=(0.5, 0.4), std=(0.25, 0.3), shuffle=True, augment=AUGMENT,
                       seed=7, **kwargs)


def epoch(loader: BatchLoader, number: int = 3, start_step: int = 0) -> list:
    loader.set_epoch(number, start_step)
    return list(loader)


def assert_same(batches: list, expected: list) -> None:
    assert len(batches) == len(expected)
    for got, want in zip(batches, expected, strict=True):
        assert got.share == want.share
        for a, b in zip(got, want, strict=True):
            assert a.device.type == "cpu" and torch.equal(a, b)


@pytest.mark.parametrize(("n", "batch_size", "world", "sizes"), [
    (23, 8, 2, [8, 8, 7]),
    (23, 8, 3, [8, 8, 7]),
    (17, 8, 3, [8, 8]),  # a last global batch of 1 < 3 is dropped in every process
    (24, 8, 3, [8, 8, 8]),
])
def test_rank_shards_concatenate_to_the_single_process_batches(n, batch_size, world, sizes):
    data = fake_set(n)
    whole = loader(data, batch_size)
    ranks = [loader(data, batch_size, rank=r, world_size=world) for r in range(world)]
    single = epoch(whole)
    shards = [epoch(r) for r in ranks]
    assert [len(r) for r in ranks] == [len(s) for s in shards] == [len(sizes)] * world
    assert all(r.num_samples == sum(sizes) for r in ranks)
    for step, size in enumerate(sizes):
        pieces = [s[step] for s in shards]
        assert [len(p.index) for p in pieces] == [(r + 1) * size // world - r * size // world for r in range(world)]
        assert sum(p.share for p in pieces) == pytest.approx(world)
        assert all(isinstance(p.share, float) for p in pieces)
        for field in range(3):
            assert torch.equal(torch.cat([p[field] for p in pieces]), single[step][field])
    assert [b.share for b in single] == [1.0] * len(single)


def test_uneven_split_shares_weight_the_global_mean():
    # 7 samples over 3 ranks: 2, 2 and 3 rows; each rank's mean loss scaled by its share, then averaged
    # over the ranks (as DDP averages gradients), is the mean over the 7.
    data = fake_set(23)
    shards = [epoch(loader(data, rank=r, world_size=3))[-1] for r in range(3)]
    losses = [b.inputs.flatten(1).sum(1) for b in shards]
    ddp = sum(b.share * loss.mean() for b, loss in zip(shards, losses, strict=True)) / 3
    torch.testing.assert_close(ddp, torch.cat(losses).mean())


@pytest.mark.parametrize("world", [1, 3])
def test_start_step_yields_the_tail_of_the_epoch(world):
    data = fake_set(23)
    for rank in range(world):
        full = epoch(loader(data, rank=rank, world_size=world))
        resumed = loader(data, rank=rank, world_size=world)
        assert_same(epoch(resumed, start_step=1), full[1:])
        assert_same(list(resumed), full[1:])  # start_step holds until the next set_epoch
        assert epoch(resumed, start_step=len(resumed)) == []
        assert_same(epoch(resumed), full)


def test_call_is_apply_of_draw():
    x = torch.rand(16, 3, 7, 5)
    for augment in (AUGMENT, Augment(crop_padding=1), Augment(hflip=True)):
        draws = augment.draw(16, torch.Generator().manual_seed(4))
        assert torch.equal(augment(x, torch.Generator().manual_seed(4)), augment.apply(x, draws))
        # Draws sliced per batch give the rows of the whole batch.
        assert torch.equal(augment.apply(x[5:11], draws[5:11]), augment.apply(x, draws)[5:11])


def test_epoch_augmentation_is_drawn_once_from_the_seeded_generator():
    data = fake_set(23)
    batches = epoch(loader(data), number=2)
    g = torch.Generator().manual_seed(7 * 1_000_003 + 2)
    order = torch.randperm(23, generator=g)
    draws = AUGMENT.draw(23, g)
    x = AUGMENT.apply(data.images[order].float() / 255, draws)
    x = (x - torch.tensor([0.5, 0.4]).view(1, 2, 1, 1)) / torch.tensor([0.25, 0.3]).view(1, 2, 1, 1)
    torch.testing.assert_close(torch.cat([b.inputs for b in batches]), x)
    assert torch.equal(torch.cat([b.index for b in batches]), order)


@pytest.mark.parametrize("on_device", [True, False, "auto"])
def test_cpu_device(on_device):
    data = fake_set(23)
    plain = loader(data)
    placed = loader(data, device="cpu", on_device=on_device)
    assert placed.device == torch.device("cpu") and placed.on_device is (on_device is not False)
    assert plain.on_device is True and plain.device == torch.device("cpu")
    assert_same(epoch(placed), epoch(plain))
    batch = epoch(placed)[0]
    inputs, labels, index = batch  # still three items
    assert inputs.dtype == torch.float32 and labels.dtype == index.dtype == torch.int64


def test_preprocessing_is_independent_of_placement_and_sharding():
    data = fake_set(10)
    assert loader(data).preprocessing == loader(data, on_device=False, rank=1, world_size=2).preprocessing
    assert loader(data).preprocessing == ("normalize(mean=(0.5, 0.4), std=(0.25, 0.3)); "
                                          "augment=Augment(crop_padding=2, hflip=True)")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"on_device": "yes"}, "on_device must be True, False or 'auto'"),
    ({"on_device": 1}, "on_device"),
    ({"rank": 2, "world_size": 2}, "rank"),
    ({"rank": -1}, "rank"),
    ({"rank": True, "world_size": 2}, "rank"),
    ({"world_size": 0}, "world_size"),
    ({"world_size": 2.0}, "world_size"),
    ({"device": "no-such-device"}, "device"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(KdistillError, match=message):
        loader(fake_set(10), **kwargs)


@pytest.mark.parametrize("start_step", [-1, 4, 1.0, True])
def test_bad_start_step(start_step):
    with pytest.raises(KdistillError, match=r"start_step must be an integer in \[0, 3\]"):
        loader(fake_set(23)).set_epoch(0, start_step)


@cuda
@pytest.mark.parametrize("on_device", [True, False, "auto"])
@pytest.mark.parametrize("world", [1, 3])
def test_cuda_batches_equal_cpu_batches(on_device, world):
    data = fake_set(23)
    for rank in range(world):
        gpu = loader(data, device="cuda", on_device=on_device, rank=rank, world_size=world)
        assert gpu.on_device is (on_device is not False)  # a tiny split fits
        cpu = epoch(loader(data, rank=rank, world_size=world))
        got = epoch(gpu)
        assert len(got) == len(cpu)
        for g, c in zip(got, cpu, strict=True):
            assert g.share == c.share and all(t.device.type == "cuda" for t in g)
            assert g.labels.dtype == g.index.dtype == torch.int64
            assert torch.equal(g.index.cpu(), c.index) and torch.equal(g.labels.cpu(), c.labels)
            torch.testing.assert_close(g.inputs.cpu(), c.inputs, rtol=0, atol=1e-6)
