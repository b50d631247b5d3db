"""The soft-label cache: keyed on what determines the teacher's outputs, rebuilt when stale or corrupt,
built once when runs share it, and an unusable cache folder is one line before any training."""

import os
import pickle
import threading
import time

import pytest
import torch
from torch import nn

from kdistill.data import BatchLoader, ImageSet
from kdistill.distill import cached_teacher_logits, check_cache_dir, soft_label_key, teacher_logits
from kdistill.distill.signals import CachedTeacher, TopKLogits, weights_digest
from kdistill.errors import KdistillError
from kdistill.train.checkpoint import load_tensors, save_tensors


class Net(nn.Module):
    """A user's teacher whose activation is a plain attribute: in neither the weights nor repr()."""

    def __init__(self, activation: str = "relu"):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        hidden = self.fc1(x.flatten(1))
        return self.fc2(torch.relu(hidden) if self.activation == "relu" else torch.tanh(hidden))


def net(activation="relu"):
    torch.manual_seed(0)  # same weights for every activation
    return Net(activation)


def config(activation):
    return f"name: net\nkwargs:\n  activation: {activation}\n"


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8, generator=generator)
    return ImageSet(images, torch.zeros(64, dtype=torch.long))


@pytest.fixture
def loader(data):
    return BatchLoader(data, 10, mean=(0.5,), std=(0.25,))


def soft_labels(teacher, data, loader, **kwargs):
    return cached_teacher_logits(teacher, loader, data.images, loader.preprocessing, **kwargs)


def test_teachers_differing_only_in_a_plain_attribute_do_not_share_logits(data, loader, soft_label_cache):
    relu, tanh = net("relu"), net("tanh")
    assert weights_digest(relu) == weights_digest(tanh) and repr(relu) == repr(tanh)
    lines = []
    first, path, built = soft_labels(relu, data, loader, log=lines.append)
    assert built and lines == []
    # Without a config to tell them apart (the Python API), the probe in the entry does.
    second, same_path, rebuilt = soft_labels(tanh, data, loader, log=lines.append)
    assert same_path == path and rebuilt
    torch.testing.assert_close(second, teacher_logits(tanh, loader, len(data)))
    assert not torch.allclose(first, second)
    assert len(lines) == 1 and str(path) in lines[0] and "stale" in lines[0] and "rebuilding" in lines[0]


def test_the_teacher_config_is_part_of_the_key(data, loader, soft_label_cache):
    relu, tanh = net("relu"), net("tanh")
    key = soft_label_key(relu, data.images, loader.preprocessing, teacher_config=config("relu"))
    assert key != soft_label_key(tanh, data.images, loader.preprocessing, teacher_config=config("tanh"))
    # repr() shows standard modules' constructor arguments: a different slope is another teacher.
    leaky = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.LeakyReLU(0.01))
    steep = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.LeakyReLU(0.2))
    steep.load_state_dict(leaky.state_dict())
    assert soft_label_key(leaky, data.images, "p") != soft_label_key(steep, data.images, "p")
    lines = []
    runs = [soft_labels(teacher, data, loader, teacher_config=config(teacher.activation), log=lines.append)
            for teacher in (relu, tanh, relu, tanh)]
    assert [built for _, _, built in runs] == [True, True, False, False]  # two entries, no rebuilding back and forth
    assert runs[0][1] != runs[1][1] and lines == []
    torch.testing.assert_close(runs[3][0], teacher_logits(tanh, loader, len(data)))


def test_changed_behaviour_under_the_same_config_is_rebuilt(data, loader, soft_label_cache, monkeypatch):
    teacher = net()
    before, path, _ = soft_labels(teacher, data, loader, teacher_config=config("relu"))
    original = Net.forward
    monkeypatch.setattr(Net, "forward", lambda self, x: original(self, x) * 2)  # edited code, same everything else
    lines = []
    after, same_path, built = soft_labels(teacher, data, loader, teacher_config=config("relu"), log=lines.append)
    assert same_path == path and built and len(lines) == 1
    torch.testing.assert_close(after, before * 2)


def test_last_bit_differences_do_not_rebuild(data, loader, soft_label_cache):
    teacher = net()
    logits, path, _ = soft_labels(teacher, data, loader)
    tensors, metadata = load_tensors(path)
    # What another thread count can do to float outputs: tiny relative differences.
    tensors["probe_outputs"] = tensors["probe_outputs"] * (1 + 3e-6)
    save_tensors(path, tensors, metadata)
    torch.set_num_threads(2)
    lines = []
    again, _, built = soft_labels(teacher, data, loader, log=lines.append)
    assert not built and lines == []
    assert torch.equal(again, logits)


def edit_entry(path, change):
    tensors, metadata = load_tensors(path)
    save_tensors(path, change(tensors), metadata)


def nan(tensors):
    tensors["logits"][3, 1] = float("nan")
    return tensors


class Payload:
    """A pickle that creates a folder when unpickled: proof that nothing was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


CORRUPTIONS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:100]),
    "not safetensors": lambda path: path.write_bytes(pickle.dumps(Payload(path.parent / "unpickled"))),
    "wrong shape": lambda path: edit_entry(path, lambda t: {**t, "logits": t["logits"][:-1]}),
    "NaN": lambda path: edit_entry(path, nan),
    "no probe": lambda path: edit_entry(path, lambda t: {"logits": t["logits"]}),  # kdistill <= 0.1's entries
    "probe of another shape": lambda path: edit_entry(path, lambda t: {**t, "probe_inputs": torch.zeros(8, 5)}),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_entry_is_rebuilt_with_one_line(data, loader, soft_label_cache, corruption, capsys):
    teacher = net()
    expected, path, _ = soft_labels(teacher, data, loader)
    CORRUPTIONS[corruption](path)
    logits, same_path, built = soft_labels(teacher, data, loader)  # the default log: stderr
    assert same_path == path and built
    torch.testing.assert_close(logits, expected)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "rebuilding it" in err
    assert not (path.parent / "unpickled").exists()
    assert not soft_labels(teacher, data, loader)[2]  # the rebuilt entry reads back


class SlowLoader:
    """A loader that takes its time and counts complete passes (the probe reads only the first batch)."""

    def __init__(self, loader):
        self.loader, self.passes, self.started = loader, 0, threading.Event()
        self.preprocessing = loader.preprocessing

    def __iter__(self):
        for batch in self.loader:
            self.started.set()
            time.sleep(0.05)
            yield batch
        self.passes += 1


def test_two_runs_sharing_a_teacher_compute_its_logits_once(data, loader, soft_label_cache):
    slow, results = SlowLoader(loader), {}
    first = threading.Thread(target=lambda: results.update(first=soft_labels(net(), data, slow)))
    first.start()
    assert slow.started.wait(timeout=60)
    lines = []
    logits, _, built = soft_labels(net(), data, slow, log=lines.append)
    first.join(timeout=60)
    assert results["first"][2] and not built and slow.passes == 1
    assert torch.equal(logits, results["first"][0])
    assert len(lines) == 1 and f"PID {os.getpid()}" in lines[0]


def test_a_killed_build_leaves_no_temporaries_behind(data, loader, soft_label_cache):
    teacher = net()
    key = soft_label_key(teacher, data.images, loader.preprocessing)
    soft_label_cache.mkdir(parents=True)
    ours = soft_label_cache / f".{key}.safetensors.dead0001.tmp"
    # Another entry's temporary may belong to a run building it right now: left alone.
    theirs = soft_label_cache / f".{'0' * 32}.safetensors.dead0002.tmp"
    ours.write_bytes(b"half")
    theirs.write_bytes(b"half")
    soft_labels(teacher, data, loader)
    assert not ours.exists() and theirs.exists()


def test_a_file_as_cache_dir_is_one_line_naming_the_setting(tmp_path, data, loader):
    file = tmp_path / "soft_labels"
    file.write_text("not a folder")
    for path in (file, file / "below"):
        with pytest.raises(KdistillError, match=r"^distill\.cache_dir: cannot store soft labels in "
                                                rf"{path} \([^\n]*\); point distill\.cache_dir") as err:
            check_cache_dir(path)
        assert "\n" not in str(err.value)
    with pytest.raises(KdistillError, match=rf"distill\.cache_dir: .* {file} \(a file, not a folder\)"):
        soft_labels(net(), data, loader, cache_dir=file)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (the file case covers root)")
def test_a_read_only_cache_dir_is_one_line(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(KdistillError, match=rf"^distill\.cache_dir: cannot store soft labels in {tmp_path}"):
            check_cache_dir(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_a_usable_cache_dir_is_created_and_left_clean(tmp_path, soft_label_cache):
    assert check_cache_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []
    assert check_cache_dir(None) == soft_label_cache  # $KDISTILL_CACHE_DIR


def test_a_top_k_table_keeps_each_rows_top_probabilities_and_its_tail_mass():
    logits = torch.randn(40, 100, generator=torch.Generator().manual_seed(0)) * 4
    table = TopKLogits.of(logits, 5)
    assert table.values.dtype == torch.float16 and table.classes.dtype == torch.int16 and table.shape == (40, 100)
    index = torch.tensor([3, 0, 39, 3])
    rebuilt, original = table[index].softmax(1), logits[index].softmax(1)
    top = original.topk(5, dim=1).indices
    # The stored classes keep their probabilities (to fp16's rounding of the logits), the rest its mass.
    torch.testing.assert_close(rebuilt.gather(1, top), original.gather(1, top), rtol=5e-3, atol=1e-6)
    torch.testing.assert_close(rebuilt.sum(1), torch.ones(4))
    rest = rebuilt.scatter(1, top, 0.0)
    assert torch.allclose(rest.sum(1), original.scatter(1, top, 0.0).sum(1), rtol=5e-3)
    assert torch.allclose(rest.max(1).values * 95, rest.sum(1), rtol=1e-5)  # spread evenly over 95 classes
    # With one class left out, its logit is the tail's log-sum-exp itself: the row is rebuilt whole.
    torch.testing.assert_close(TopKLogits.of(logits, 99)[index], logits[index], rtol=1e-3, atol=1e-2)
    assert torch.equal(CachedTeacher(table)(torch.zeros(4), index).logits, table[index])


def test_a_top_k_entry_is_stored_compactly_keyed_apart_and_read_back(data, loader, soft_label_cache):
    teacher = net()
    full, full_path, _ = soft_labels(teacher, data, loader)
    table, path, built = soft_labels(teacher, data, loader, top_k=1)
    assert built and path != full_path and isinstance(table, TopKLogits)
    assert set(load_tensors(path)[0]) == {"top_values", "top_classes", "tail_logsumexp", "probe_inputs",
                                          "probe_outputs"}
    torch.testing.assert_close(table.values.float(), full.max(1, keepdim=True).values, rtol=1e-3, atol=1e-3)
    again, _, built = soft_labels(teacher, data, loader, top_k=1)
    assert not built and torch.equal(again.values, table.values) and torch.equal(again.tail, table.tail)
    # k at or above the class count (3) keeps every logit: the full table, under its own key.
    assert soft_labels(teacher, data, loader, top_k=3)[1:] == (full_path, False)


def test_a_top_k_entry_with_a_class_out_of_range_is_rebuilt(data, loader, soft_label_cache, capsys):
    teacher = net()
    _, path, _ = soft_labels(teacher, data, loader, top_k=2)
    edit_entry(path, lambda t: {**t, "top_classes": t["top_classes"] + 3})
    assert soft_labels(teacher, data, loader, top_k=2)[2]
    err = capsys.readouterr().err
    assert "class indices outside [0, 3)" in err and "rebuilding it" in err


def test_processes_sharing_a_build_each_run_the_teacher_on_their_share(data):
    """What torchrun's processes do (`total` is their all-reduce sum): each fills its rows; the sum is the table."""
    teacher = net()
    shares = [BatchLoader(data, 10, mean=(0.5,), std=(0.25,), rank=r, world_size=2) for r in (0, 1)]
    whole = teacher_logits(teacher, BatchLoader(data, 10, mean=(0.5,), std=(0.25,)), 64)
    sent = {}

    def send(tensor):  # rank 1's contribution, recorded as an all-reduce would receive it
        sent[tensor.ndim] = tensor.clone()
        return tensor

    with pytest.raises(ValueError, match="every training sample exactly once"):
        teacher_logits(teacher, shares[1], 64, total=send)  # a share alone is not the table
    table = teacher_logits(teacher, shares[0], 64, total=lambda tensor: tensor + sent[tensor.ndim])
    torch.testing.assert_close(table, whole)
    assert 0 < sent[1].sum() < 64  # rank 1 ran the teacher on some of the samples, not all
