"""Teacher features cached like soft labels: the same values as the live teacher's (to fp16), one
memory-mapped file per tapped module, rebuilt when damaged, fp32 where fp16 would overflow."""

import numpy as np
import pytest
import torch
from torch import nn

from kdistill import Distiller
from kdistill.data import BatchLoader, ImageSet
from kdistill.distill.signals import CachedTeacher, LiveTeacher, cached_teacher_features, feature_file
from kdistill.losses import build_objective
from kdistill.models.registry import create_model

TAPS = ("stages.0", "stages.1.0.conv2", "head")


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=generator),
                    torch.randint(0, 3, (40,), generator=generator))


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return create_model("resnet", (1, 8, 8), 3, width=8, depth=1).eval()


def plain(data, batch_size=16, **kwargs):
    return BatchLoader(data, batch_size, mean=(0.5,), std=(0.25,), **kwargs)


def test_cached_features_are_the_live_teachers(data, teacher, soft_label_cache):
    tables, files, built = cached_teacher_features(teacher, plain(data), "k" * 32, TAPS, 40, soft_label_cache)
    assert built and [f.name for f in files] == [feature_file(soft_label_cache, "k" * 32, p).name for p in TAPS]
    assert all(t.dtype == torch.float16 for t in tables.values())
    live, cached = LiveTeacher(teacher, TAPS), CachedTeacher(torch.zeros(40, 3), tables)
    for batch in plain(data, 8, shuffle=True):  # shuffled: rows are found by sample index
        inputs, _, index = batch
        expected, got = live(inputs).features, cached(inputs, index).features
        for path in TAPS:
            torch.testing.assert_close(got[path], expected[path], rtol=1e-3, atol=1e-3)  # fp16 storage
    again, _, built = cached_teacher_features(teacher, plain(data), "k" * 32, TAPS, 40, soft_label_cache)
    assert not built and all(torch.equal(again[p], tables[p]) for p in TAPS)
    assert isinstance(np.load(files[0], mmap_mode="r"), np.memmap)


@pytest.mark.filterwarnings("ignore:the teacher gets")  # untrained on purpose
def test_a_feature_term_trains_from_cached_features_as_from_the_live_teacher(data, teacher, soft_label_cache):
    losses = {"ce": {}, "hint": {"type": "fitnet", "student": "stages.1", "teacher": "stages.1"},
              "sp": {"student": "stages.0", "teacher": "stages.0"}}
    tables, _, _ = cached_teacher_features(teacher, plain(data), "k" * 32, ("stages.1", "stages.0"), 40,
                                           soft_label_cache)
    logits = torch.cat([teacher(batch[0]) for batch in plain(data)]).detach()
    results = []
    for kwargs in ({}, {"soft_labels": logits, "teacher_features": tables}):
        torch.manual_seed(0)
        student = create_model("resnet", (1, 8, 8), 3, width=4, depth=1)
        distiller = Distiller(teacher, student, build_objective(losses), **kwargs)
        assert isinstance(distiller.signal, CachedTeacher if kwargs else LiveTeacher)
        results.append(distiller.fit(plain(data, shuffle=True), epochs=2, lr=0.01, progress="quiet").history)
    for live, cached in zip(*results, strict=True):
        for key in ("train_hint", "train_sp", "train_loss"):
            assert cached[key] == pytest.approx(live[key], rel=1e-2), key


def test_a_damaged_or_missing_feature_file_is_rebuilt(data, teacher, soft_label_cache, capsys):
    def build():
        return cached_teacher_features(teacher, plain(data), "k" * 32, TAPS, 40, soft_label_cache,
                                       log=lambda line: print(line))

    tables, files, _ = build()
    expected = tables["head"].clone()
    files[2].write_bytes(files[2].read_bytes()[:100])  # truncated
    tables, _, built = build()
    assert built and torch.equal(tables["head"], expected)
    assert "does not read back as an array" in capsys.readouterr().out
    files[1].unlink()
    assert build()[2]  # one of the files is gone: all rebuilt, silently (nothing was damaged)
    np.save(files[0], np.full((40, 8, 8, 8), np.nan, dtype=np.float16))
    assert build()[2] and "holds NaN or inf" in capsys.readouterr().out
    np.save(files[0], np.zeros((39, 8, 8, 8), dtype=np.float16))
    assert build()[2] and "for 40 samples" in capsys.readouterr().out
    assert sorted(p.name for p in soft_label_cache.glob("*.npy")) == sorted(f.name for f in files)
    assert not list(soft_label_cache.glob(".*.tmp"))  # no temporaries left behind


def test_features_beyond_fp16_are_stored_in_fp32(data, soft_label_cache):
    class Loud(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 4)

        def forward(self, x):
            return self.body(x.flatten(1)) * 1e6

    tables, _, _ = cached_teacher_features(Loud(), plain(data), "k" * 32, ("body",), 40, soft_label_cache)
    assert tables["body"].dtype == torch.float16  # the module's own output is small
    scaled = Loud()
    with torch.no_grad():
        scaled.body.weight.mul_(1e6)
    tables, _, _ = cached_teacher_features(scaled, plain(data), "j" * 32, ("body",), 40, soft_label_cache)
    assert tables["body"].dtype == torch.float32 and torch.isfinite(tables["body"]).all()


def test_a_teacher_whose_features_are_nan_is_refused(data, soft_label_cache):
    from kdistill.errors import KdistillError

    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        teacher[1].weight.fill_(float("nan"))
    with pytest.raises(KdistillError, match="features at 1 contain NaN"):
        cached_teacher_features(teacher, plain(data), "k" * 32, ("1",), 40, soft_label_cache)
    assert not list(soft_label_cache.glob("*.npy")) and not list(soft_label_cache.glob(".*.tmp"))
