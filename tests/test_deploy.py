"""Deployment: pruning, MAC counting, rebuilding pruned models, ONNX export and int8, deployable folders,
`kdistill compress` and `kdistill predict` end to end on digits, and every bad input of issue 12."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kdistill.cli import main
from kdistill.deploy.bundle import ModelCard, load_bundle, save_bundle
from kdistill.deploy.export import export_onnx, onnx_logits, onnx_session
from kdistill.deploy.prune import Pruning, bake_masks, parse_pruning, prune, sparsity
from kdistill.deploy.quantize import quantize_onnx
from kdistill.errors import KdistillError
from kdistill.models import count_parameters, create_model
from kdistill.models.probe import count_macs
from tests.conftest import fails_cleanly

MNIST = (1, 28, 28)


def _card(model_name, kwargs, shape=MNIST, classes=10):
    return ModelCard(model=model_name, kwargs=kwargs, input_shape=list(shape), mean=[0.3] * shape[0],
                     std=[0.2] * shape[0], classes=[f"c{i}" for i in range(classes)])


def test_count_macs_is_exact_for_the_seed_student():
    model = create_model("seed_student", MNIST, 10)
    conv1, conv2, fc1, fc2 = model.conv1, model.conv2, model.fc1, model.fc2
    expected = (28 * 28 * conv1.out_channels * 9 * 1 + 14 * 14 * conv2.out_channels * 9 * conv1.out_channels
                + fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features)
    assert count_macs(model, MNIST) == expected


@pytest.mark.parametrize("name,kwargs", [("seed_student", {}), ("resnet", {"width": 8})])
def test_channel_pruning_makes_a_smaller_model_that_rebuilds_from_its_weights(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, MNIST, 10, **kwargs).eval()
    pruned = prune(model, Pruning("channels", 0.5), MNIST)
    assert count_parameters(pruned) < 0.4 * count_parameters(model)
    assert count_macs(pruned, MNIST) < 0.4 * count_macs(model, MNIST)
    assert count_parameters(model) == count_parameters(create_model(name, MNIST, 10, **kwargs))  # source untouched
    save_bundle(tmp_path, pruned, _card(name, kwargs))
    loaded, card = load_bundle(tmp_path)
    x = torch.randn(4, *MNIST)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert card.num_classes == 10


def test_unstructured_pruning_zeroes_the_share_and_fine_tuning_cannot_revive_it():
    torch.manual_seed(0)
    model = create_model("seed_student", MNIST, 10)
    pruned = prune(model, Pruning("unstructured", 0.7), MNIST).train()
    assert sparsity(pruned) == pytest.approx(0.7, abs=1e-3)
    optimizer = torch.optim.Adam(pruned.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        pruned(torch.randn(8, *MNIST)).square().mean().backward()
        optimizer.step()
    assert sparsity(pruned) == pytest.approx(0.7, abs=1e-3)
    plain = bake_masks(pruned)
    assert set(plain.state_dict()) == set(model.state_dict())  # exports as the plain architecture
    assert sparsity(plain) == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("text,expected", [("channels:1", "must be in [0, 1)"), ("channels:-0.1", "[0, 1)"),
                                           ("magnitude:0.5", "must be one of"), ("channels", "after a colon")])
def test_bad_pruning_is_one_line(text, expected):
    with pytest.raises(KdistillError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_pruning(text)


def test_pruning_that_would_empty_a_layer_is_refused_with_its_name():
    model = create_model("mlp", (1, 8, 8), 10, hidden=[32, 2])
    with pytest.raises(KdistillError, match=r"every channel of 'body.fc2' \(2 channels\)"):
        prune(model, Pruning("channels", 0.6), (1, 8, 8))
    pruned = prune(model, Pruning("channels", 0.4), (1, 8, 8))  # 2 * 0.6 rounds down to 1: kept
    assert pruned.body.fc2.out_features == 1 and pruned.body.fc1.out_features == 19  # int(32 * 0.6)


@pytest.mark.parametrize("name,kwargs", [("seed_student", {}), ("resnet", {"width": 8})])
def test_onnx_export_matches_pytorch(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, MNIST, 10, **kwargs).eval()
    export_onnx(model, MNIST, tmp_path / "m.onnx")
    x = torch.randn(37, *MNIST)  # not the exported example's batch: the batch axis is dynamic
    with torch.no_grad():
        assert (onnx_logits(onnx_session(tmp_path / "m.onnx"), x) - model(x)).abs().max() <= 1e-4


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # Python control flow on a tensor's value


class WithBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.gate = Branchy()

    def forward(self, x):
        return self.gate(self.body(x))


def test_export_names_the_module_it_cannot_trace(tmp_path):
    with pytest.raises(KdistillError, match=r"module 'gate' \(Branchy\) cannot be traced"):
        export_onnx(WithBranch().eval(), (1, 8, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class EinsumHead(nn.Module):
    """A conv (int8 in onnxruntime) and an einsum (no int8 kernel)."""

    def __init__(self, conv=True):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1) if conv else nn.Identity()
        self.weight = nn.Parameter(torch.randn(10, (4 if conv else 1) * 64))

    def forward(self, x):
        return torch.einsum("bi,ci->bc", self.conv(x).flatten(1), self.weight)


def test_int8_names_the_layers_left_in_fp32_and_refuses_a_model_with_none_quantisable(tmp_path):
    torch.manual_seed(0)
    export_onnx(EinsumHead().eval(), (1, 8, 8), tmp_path / "mixed.onnx")
    result = quantize_onnx(tmp_path / "mixed.onnx", tmp_path / "mixed8.onnx", "static", torch.randn(64, 1, 8, 8))
    assert result.quantized == ["module 'conv'"] and result.kept_fp32 == ["Einsum in the model's own forward"]
    export_onnx(EinsumHead(conv=False).eval(), (1, 8, 8), tmp_path / "einsum.onnx")
    with pytest.raises(KdistillError, match="int8 kernel"):
        quantize_onnx(tmp_path / "einsum.onnx", tmp_path / "einsum8.onnx", "dynamic")
    assert not (tmp_path / "einsum8.onnx").exists()


# -- kdistill compress and predict, end to end on digits ---------------------------------------------------------
@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A digits run with a conv student, pruned both ways, int8 both ways, exported."""
    out = tmp_path_factory.mktemp("deploy")
    cache = out / "cache"
    common = [f"out_dir={out}", f"distill.cache_dir={cache}", "student.name=seed_student", "train.epochs=4",
              "teacher.train.epochs=4", "--quiet"]
    assert main(["run", "recipes/digits_quick.yaml", *common]) == 0
    run = out / "digits_quick"
    assert main(["compress", str(run), "--prune", "channels:0.5", "--prune", "unstructured:0.5", "--quantize",
                 "int8", "--quantize", "dynamic", "--quantize", "qat", "--export", "onnx", "compress.finetune.epochs=2",
                 "compress.latency_repeats=5", "compress.calibration_images=200", "--quiet"]) == 0
    return run


def test_compress_makes_a_folder_per_step_measured_side_by_side(compressed):
    folder = compressed / "compressed"
    metrics = json.loads((folder / "metrics.json").read_text())
    expected = {"teacher", "baseline", "student", "channels50", "channels50_unstructured50"}
    expected |= {f"{n}_int8_{m}" for n in list(expected) for m in ("static", "dynamic")}
    expected |= {f"{n}_int8_qat" for n in ("student", "channels50", "channels50_unstructured50")}  # students only
    assert set(metrics["rows"]) == expected
    models = metrics["models"]
    assert models["channels50"]["params"] < 0.4 * models["student"]["params"]
    assert models["channels50"]["macs"] < 0.4 * models["student"]["macs"]
    assert models["channels50_unstructured50"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert models["channels50_unstructured50"]["params"] == models["channels50"]["params"]
    for name in ("student", "channels50"):
        card = json.loads((folder / name / "model.json").read_text())
        assert card["onnx"]["opset"] == 18 and card["onnx"]["max_abs_logit_difference"] <= 1e-4
        runtimes = models[name]["runtimes"]
        assert runtimes["pytorch"]["test_accuracy"] == pytest.approx(runtimes["onnxruntime"]["test_accuracy"],
                                                                     abs=0.005)
        for runtime in runtimes.values():
            assert {"batch_1", "batch_256"} <= runtime["latency_ms"].keys()
            assert runtime["latency_ms"]["batch_1"]["p90_ms"] >= runtime["latency_ms"]["batch_1"]["median_ms"]
    assert models["student_int8_static"]["bytes"]["onnx"] < models["student"]["bytes"]["onnx"]
    assert models["student_int8_static"]["runtimes"]["onnxruntime"]["test_accuracy"] > 0.5
    qat = json.loads((folder / "student_int8_qat" / "model.json").read_text())["made_from"]
    assert qat["int8_layers"] and qat["best_epoch"] >= 1  # trained through the loop, int8 in the ONNX graph
    assert (folder / "student_int8_qat" / "metrics.jsonl").exists()
    assert models["student_int8_qat"]["runtimes"]["onnxruntime"]["test_accuracy"] > 0.5
    assert (folder / "frontier.png").stat().st_size > 10_000
    assert "Fastest model keeping 99 % of the teacher's accuracy (chosen on the validation split)" in \
        (folder / "report.md").read_text()
    assert all("val_accuracy" in runtime for row in models.values() for runtime in row["runtimes"].values())
    assert (folder / "channels50" / "metrics.jsonl").exists()  # fine-tuned through the loop
    assert not (folder / "channels50" / "train_state.safetensors").exists()


def test_compress_again_reuses_every_step(compressed, capsys):
    before = (compressed / "compressed" / "channels50" / "model.safetensors").stat().st_mtime_ns
    assert main(["compress", str(compressed), "--prune", "channels:0.5", "--export", "onnx",
                 "compress.finetune.epochs=2", "compress.latency_repeats=5"]) == 0
    said = capsys.readouterr()
    assert "[channels50] using" in said.out + said.err and "ONNX opset" not in said.out + said.err
    assert (compressed / "compressed" / "channels50" / "model.safetensors").stat().st_mtime_ns == before
    # the step flags replaced the recorded steps (no second pruning, no int8) ...
    rows = set(json.loads((compressed / "compressed" / "metrics.json").read_text())["rows"])
    assert rows == {"teacher", "baseline", "student", "channels50"}
    # ... and with no step flag, the recorded ones run again
    assert main(["compress", str(compressed), "--quiet"]) == 0
    assert set(json.loads((compressed / "compressed" / "metrics.json").read_text())["rows"]) == rows


def test_predict_reads_images_and_arrays_in_both_runtimes(compressed, tmp_path, capsys):
    from kdistill.config import load_config
    from kdistill.pipeline import recipe_data

    data = recipe_data(load_config("recipes/digits_quick.yaml"))
    pixels = data.test.images[:4].numpy()
    np.save(tmp_path / "batch.npy", pixels)
    Image.fromarray(pixels[0, 0]).save(tmp_path / "one.png")
    results = {}
    for folder, runtime in (("channels50", "pytorch"), ("channels50", "onnxruntime"),
                            ("student_int8_static", "onnxruntime")):
        assert main(["predict", str(compressed / "compressed" / folder), str(tmp_path / "batch.npy"),
                     str(tmp_path / "one.png"), "--runtime", runtime, "--top", "2"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 5 and all(line.count(",") == 1 for line in lines)
        results[(folder, runtime)] = [line.split(": ")[1].split()[0] for line in lines]
    assert results[("channels50", "pytorch")] == results[("channels50", "onnxruntime")]
    assert results[("channels50", "pytorch")][0] == results[("channels50", "pytorch")][4]  # the PNG is row 0


def test_predict_bad_inputs_fail_cleanly(compressed, tmp_path, capsys):
    student = compressed / "compressed" / "student"
    pixels = np.zeros((8, 8), dtype=np.uint8)
    Image.fromarray(pixels).convert("RGB").save(tmp_path / "colour.png")
    (tmp_path / "text.png").write_text("not an image")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "shape.npy", np.zeros((2, 3, 8, 8), dtype=np.uint8))
    fails_cleanly(capsys, ["predict", str(student), str(tmp_path / "colour.png")], "3 colour channel(s)")
    fails_cleanly(capsys, ["predict", str(student), str(tmp_path / "text.png")], "not an image")
    fails_cleanly(capsys, ["predict", str(student), str(tmp_path / "objects.npy")], "not a readable .npy")
    fails_cleanly(capsys, ["predict", str(student), str(tmp_path / "shape.npy")], "[N, 1, 8, 8]")
    fails_cleanly(capsys, ["predict", str(compressed / "compressed" / "student_int8_static"),
                           str(tmp_path / "one.npy")], "not found")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.json", "model.safetensors"):
        (broken / name).write_bytes((student / name).read_bytes())
    with open(broken / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    np.save(tmp_path / "ok.npy", pixels)
    fails_cleanly(capsys, ["predict", str(broken), str(tmp_path / "ok.npy")], "truncated or replaced")
    (broken / "model.json").write_text("{")
    fails_cleanly(capsys, ["predict", str(broken), str(tmp_path / "ok.npy")], "not a readable kdistill model")
    fails_cleanly(capsys, ["predict", str(tmp_path), str(tmp_path / "ok.npy")], "no model.json")


def test_compress_bad_inputs_fail_cleanly(compressed, tmp_path, capsys):
    fails_cleanly(capsys, ["compress", str(compressed), "--prune", "channels:1.0"], "must be in [0, 1)")
    fails_cleanly(capsys, ["compress", str(tmp_path)], "not a kdistill run folder")
    fails_cleanly(capsys, ["compress", str(compressed), "compress.opset=5"], "compress.opset")


def test_a_recipe_compress_section_makes_run_end_with_it(tmp_path, soft_label_cache):
    assert main(["run", "recipes/digits_quick.yaml", f"out_dir={tmp_path}", "train.epochs=2", "teacher.train.epochs=2",
                 "compress.export=true", "compress.latency_repeats=5", "--quiet"]) == 0
    run = tmp_path / "digits_quick"
    assert (run / "compressed" / "student" / "model.onnx").is_file()
    report = (run / "report.md").read_text()
    assert "## Compressed models" in report and "| student | onnxruntime |" in report
