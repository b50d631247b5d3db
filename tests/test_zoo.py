"""The CIFAR knowledge-distillation zoo: published sizes and state-dict keys, and each one trains."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

from kdistill.models import count_parameters, create_model

# Counted from RepDistiller's own definitions (github.com/HobbitLong/RepDistiller, commit b84f547, models/),
# built with num_classes=100 and with num_classes=10; the CRD paper's table rounds them to 1.23M, 7.43M, ...
OFFICIAL_PARAMETERS = {
    "resnet8x4": (1_233_540, 1_210_410), "resnet32x4": (7_433_860, 7_410_730),
    "resnet20": (278_324, 272_474), "resnet56": (861_620, 855_770),
    "wrn_16_2": (703_284, 691_674), "wrn_40_2": (2_255_156, 2_243_546),
    "vgg8": (3_965_028, 3_918_858), "vgg13": (9_462_180, 9_416_010),
    "mobilenetv2": (812_836, 697_546), "shufflenetv2": (1_355_528, 1_263_278),
}
# The first 16 hex digits of sha256 over the official state dict's "key (shape)" lines, in order, at
# num_classes=100 (same source; mdistiller's models/cifar/ give the same): equal digests mean that a
# published RepDistiller or mdistiller checkpoint loads into ours unchanged.
OFFICIAL_STATE_DICTS = {
    "resnet8x4": "a04332a459ae1465", "resnet32x4": "24fbb1ea1d0f23f9",
    "resnet20": "d62528ebf09500ac", "resnet56": "7d3a91d4a8b97b8c",
    "wrn_16_2": "5994bb013d98efa7", "wrn_40_2": "9a74d15007bab65e",
    "vgg8": "fdc773ff39915584", "vgg13": "bf74037647da8d81",
    "mobilenetv2": "68a2c5f51e5cea07", "shufflenetv2": "577996dd44e66b38",
}
ZOO = sorted(OFFICIAL_PARAMETERS)


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts_match_the_official_models(name):
    cifar100, cifar10 = OFFICIAL_PARAMETERS[name]
    assert count_parameters(create_model(name, (3, 32, 32), 100)) == cifar100
    assert count_parameters(create_model(name, (3, 32, 32), 10)) == cifar10


@pytest.mark.parametrize("name", ZOO)
def test_state_dicts_have_the_official_keys_and_shapes(name):
    state = create_model(name, (3, 32, 32), 100).state_dict()
    lines = "\n".join(f"{key} {tuple(value.shape)}" for key, value in state.items())
    assert hashlib.sha256(lines.encode()).hexdigest()[:16] == OFFICIAL_STATE_DICTS[name]


@pytest.mark.parametrize("name", ZOO)
def test_one_training_step(name):
    torch.manual_seed(0)
    model = create_model(name, (3, 32, 32), 100)
    inputs = torch.randint(0, 256, (2, 3, 32, 32)).float().div(255).sub(0.5)
    labels = torch.tensor([3, 97])
    logits = model(inputs)
    assert logits.shape == (2, 100) and torch.isfinite(logits).all()
    F.cross_entropy(logits, labels).backward()
    for path, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), path
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(inputs), model(inputs))  # eval mode is deterministic


@pytest.mark.parametrize("name", ZOO)
def test_greyscale_28x28_input(name):
    """Fashion-MNIST-sized inputs work: channels come from the data, global pooling adapts to the size."""
    model = create_model(name, (1, 28, 28), 10).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "mobilenetv2", "shufflenetv2"])
def test_other_image_sizes(name):
    for shape in ((3, 64, 64), (3, 8, 40)):  # vgg pools once more at 64 pixels, as the official code does
        model = create_model(name, shape, 10).eval()
        with torch.no_grad():
            assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_arguments_are_checked():
    from kdistill.errors import KdistillError

    with pytest.raises(KdistillError, match="dropout must be a number in"):
        create_model("wrn_16_2", (3, 32, 32), 100, dropout=2)
    with pytest.raises(KdistillError, match="width_mult must be a number from 0.1 to 4"):
        create_model("mobilenetv2", (3, 32, 32), 100, width_mult="wide")
    with pytest.raises(KdistillError, match="does not take argument 'width'"):
        create_model("resnet8x4", (3, 32, 32), 100, width=3)
    with pytest.raises(KdistillError, match="'vgg8' needs images of at least 8x8 pixels"):
        create_model("vgg8", (3, 32, 7), 100)  # not a shape error in the middle of the first epoch


@pytest.mark.parametrize("recipe", ["cifar100_resnet32x4_resnet8x4", "cifar100_wrn_40_2_wrn_16_2"])
def test_the_cifar100_recipes_run(tmp_path, capsys, recipe, soft_label_cache):
    """The published protocol's recipes, for one epoch on a tiny generated CIFAR-100 archive."""
    import json

    from test_data_cifar_npz import write_cifar100
    from test_hostile_runs import cli

    write_cifar100(tmp_path / "data", n=24)
    code, err = cli(capsys, "run", f"recipes/{recipe}.yaml", f"data.root={tmp_path / 'data'}", "data.val_size=4",
                    "data.download=false", "train.epochs=1", "train.milestones=[1]", "train.batch_size=10",
                    f"out_dir={tmp_path}", "eval.latency_repeats=1", "eval.latency_batches=[1]", "threads=1")
    assert code == 0, err
    config = (tmp_path / recipe / "config.yaml").read_text()
    assert "lr: 0.05" in config and "milestones:\n  - 1" in config
    metrics = json.loads((tmp_path / recipe / "metrics.json").read_text())
    assert metrics["data"]["num_classes"] == 100 and metrics["teacher_signal"] is not None
