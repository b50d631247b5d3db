"""BatchLoader across processes and devices: the same batches, however they are split or where they are built."""

import pytest
import torch

from kdistill.data import Augment, BatchLoader
from kdistill.data.sets import ImageSet
from kdistill.errors import KdistillError

AUGMENT = Augment(crop_padding=2, hflip=True)


def images(n: int = 23) -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, 6, 5), dtype=torch.uint8, generator=generator),
                    torch.arange(n, dtype=torch.int64))


def loader(data, **options) -> BatchLoader:
    return BatchLoader(data, 8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), shuffle=True, augment=AUGMENT, seed=3,
                       **options)


def epoch(batches: BatchLoader, number: int = 1, start_step: int = 0) -> list:
    batches.set_epoch(number, start_step=start_step)
    return list(batches)


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_processes_shards_put_together_are_the_one_process_batches(world_size):
    data = images()  # batches of 8, 8 and 7: the last splits unevenly
    whole = epoch(loader(data))
    shards = [epoch(loader(data, rank=r, world_size=world_size)) for r in range(world_size)]
    assert all(len(s) == len(whole) == 3 for s in shards)
    for step, batch in enumerate(whole):
        for field in range(3):
            torch.testing.assert_close(torch.cat([s[step][field] for s in shards]), batch[field], rtol=0, atol=0)
        assert sum(s[step].share for s in shards) == pytest.approx(world_size)  # each weighs its rows
    rows = {2: [3, 4], 3: [2, 2, 3]}[world_size]  # of the last batch's 7
    assert [s[2].share for s in shards] == pytest.approx([r * world_size / 7 for r in rows])


def test_a_last_batch_smaller_than_the_process_count_is_dropped_everywhere():
    data = images(17)  # 8, 8, then 1 sample for 2 processes
    shards = [loader(data, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2] and shards[0].num_samples == 16
    assert sum(len(b.labels) for s in shards for b in epoch(s)) == 16
    assert len(loader(data)) == 3  # one process keeps it


def test_an_evaluation_loader_keeps_every_sample_across_processes():
    data = images(17)
    shards = [BatchLoader(data, 8, mean=(0.5,) * 3, std=(0.2,) * 3, rank=r, world_size=2) for r in range(2)]
    labels = torch.cat([b.labels for s in shards for b in s])
    assert sorted(labels.tolist()) == list(range(17))


def test_start_step_yields_the_tail_of_the_epoch():
    data = images()
    full, tail = epoch(loader(data)), epoch(loader(data), start_step=2)
    assert len(tail) == 1
    for a, b in zip(full[2], tail[0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_draw_then_apply_is_the_augmentation():
    x = torch.rand(5, 3, 6, 5)
    direct = AUGMENT(x, torch.Generator().manual_seed(1))
    draws = AUGMENT.draw(5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(AUGMENT.apply(x, draws), direct, rtol=0, atol=0)
    # A slice of an epoch's draws augments the same samples the same way.
    torch.testing.assert_close(AUGMENT.apply(x[2:4], draws[2:4]), direct[2:4], rtol=0, atol=0)


def test_on_device_or_not_on_the_cpu_gives_the_same_batches():
    data = images()
    for a, b in zip(epoch(loader(data, on_device=True)), epoch(loader(data, on_device=False)), strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("options, expected", [
    ({"on_device": "yes"}, "on_device must be True, False or 'auto'"),
    ({"rank": 2, "world_size": 2}, "rank must be an integer with 0 <= rank < world_size (2)"),
    ({"world_size": 0}, "world_size must be a positive integer"),
    ({"rank": True}, "rank must be an integer"),
])
def test_bad_arguments_are_one_line(options, expected):
    with pytest.raises(KdistillError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        loader(images(), **options)


def test_a_start_step_past_the_epoch_is_refused():
    with pytest.raises(KdistillError, match="start_step must be an integer in"):
        loader(images()).set_epoch(0, start_step=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("on_device", [True, False])
def test_batches_built_on_the_gpu_are_the_cpu_batches(on_device):
    data = images()
    gpu = loader(data, device="cuda", on_device=on_device)
    assert gpu.on_device is on_device
    for a, b in zip(epoch(gpu), epoch(loader(data)), strict=True):
        assert all(t.device.type == "cuda" for t in a)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x.cpu(), y, rtol=1e-6, atol=1e-6)
