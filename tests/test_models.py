"""Models: the registry and factory, the seed CNNs, mlp, resnet, user models, and their errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from kdistill.errors import KdistillError
from kdistill.models import MODELS, count_parameters, create_model, output_classes, register_model

MNIST = (1, 28, 28)


def conv_params(c_in, c_out, k=3, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear_params(n_in, n_out):
    return n_in * n_out + n_out


def test_registry_lists_the_builtin_models():
    assert {"seed_teacher", "seed_student", "mlp", "resnet"} <= set(MODELS)
    assert all(info.description for info in MODELS.values())


@pytest.mark.parametrize("name, c1, c2, hidden", [("seed_teacher", 32, 64, 128), ("seed_student", 16, 32, 64)])
@pytest.mark.parametrize("shape", [MNIST, (1, 8, 8)])
def test_seed_cnns_match_the_seed_article(name, c1, c2, hidden, shape):
    model = create_model(name, shape, 10)
    spatial = (shape[1] // 4) * (shape[2] // 4)  # 7*7 on MNIST, as in the seed
    expected = (conv_params(1, c1) + conv_params(c1, c2)
                + linear_params(c2 * spatial, hidden) + linear_params(hidden, 10))
    assert count_parameters(model) == expected
    assert [name for name, _ in model.named_children()] == ["conv1", "conv2", "fc1", "fc2"]
    assert model(torch.randn(3, *shape)).shape == (3, 10)


def test_seed_cnn_parameter_counts_on_mnist():
    assert count_parameters(create_model("seed_teacher", MNIST, 10)) == 421_642
    assert count_parameters(create_model("seed_student", MNIST, 10)) == 105_866


def test_shallow_cnn_is_seed_002s_student():
    # Seed 002's Keras summary on 224x224 Flowers (5 classes): 1,792 + 73,856 + 66,048 + 2,565 parameters.
    flowers = create_model("shallow_cnn", (3, 224, 224), 5)
    assert [count_parameters(m) for m in (flowers.conv1, flowers.conv2, flowers.fc1, flowers.fc2)] == \
        [1_792, 73_856, 66_048, 2_565]
    x = torch.randn(2, 3, 224, 224)
    assert F.max_pool2d(F.relu(flowers.conv1(x)), 4).shape[-2:] == (55, 55)  # 222 -> 55, as in the summary
    assert count_parameters(create_model("shallow_cnn", MNIST, 10)) == 145_674
    assert create_model("shallow_cnn", MNIST, 10)(torch.randn(3, *MNIST)).shape == (3, 10)
    with pytest.raises(KdistillError, match="at least 14x14"):
        create_model("shallow_cnn", (1, 8, 8), 10)


def seed_forward_nchw(model, x):
    """The seed article's forward pass, plain NCHW, on the model's own weights."""
    x = F.max_pool2d(F.relu(model.conv1(x)), 2)
    x = F.max_pool2d(F.relu(model.conv2(x)), 2)
    x = x.view(x.size(0), -1)
    return model.fc2(F.relu(model.fc1(x)))


def gradients(model, logits, labels):
    model.zero_grad()
    F.cross_entropy(logits, labels).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("shape", [MNIST, (3, 32, 32)])
def test_seed_cnn_channels_last_forward_computes_the_seed_function(shape):
    torch.manual_seed(0)
    model = create_model("seed_teacher", shape, 10)
    x, y = torch.randn(4, *shape), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(model(x), seed_forward_nchw(model, x))

    # Gradients are compared with the seed function in float64, not with its float32 NCHW pass:
    # max-pool routes the gradient to the largest pixel of each window, and on (3, 32, 32) two
    # conv1 outputs lie 5e-8 apart, so the NCHW kernel's float32 rounding picks the other pixel
    # and moves one channel's weight gradient by 5e-5. Against float64 the channels-last pass
    # is off by about 3e-8; atol 1e-6 leaves room for other CPUs' summation orders.
    got = gradients(model, model(x), y)
    exact = copy.deepcopy(model).double()
    want = gradients(exact, seed_forward_nchw(exact, x.double()), y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def test_mlp_hinton_student_from_config_list():
    hidden = OmegaConf.create({"hidden": [800, 800]}).hidden  # a ListConfig, as the config passes it
    model = create_model("mlp", MNIST, 10, hidden=hidden)
    assert count_parameters(model) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    assert {"body.fc1", "body.fc2", "head"} <= dict(model.named_modules()).keys()
    assert model(torch.randn(2, *MNIST)).shape == (2, 10)


def test_mlp_dropout_layers_are_named():
    model = create_model("mlp", (1, 8, 8), 10, hidden=[32], dropout=0.5)
    assert isinstance(model.body.drop1, nn.Dropout)


def test_resnet_small_shapes_backward_and_parameters():
    model = create_model("resnet", MNIST, 10, width=8, depth=1)
    out = model(torch.randn(4, *MNIST))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    bn = 2  # BatchNorm2d: weight and bias per channel
    stem = conv_params(1, 8, bias=False) + bn * 8
    stage0 = 2 * (conv_params(8, 8, bias=False) + bn * 8)
    stage1 = (conv_params(8, 16, bias=False) + conv_params(16, 16, bias=False) + 2 * bn * 16
              + conv_params(8, 16, k=1, bias=False) + bn * 16)  # 1x1 shortcut
    stage2 = (conv_params(16, 32, bias=False) + conv_params(32, 32, bias=False) + 2 * bn * 32
              + conv_params(16, 32, k=1, bias=False) + bn * 32)
    assert count_parameters(model) == stem + stage0 + stage1 + stage2 + linear_params(32, 10)


def test_resnet_paths_and_zero_init_residual_branches():
    model = create_model("resnet", (3, 32, 32), 100, width=8, depth=2, stages=2)
    modules = dict(model.named_modules())
    assert {"stem", "stages.0.1.conv2", "stages.1.0.shortcut", "head"} <= modules.keys()
    assert "stages.2" not in modules
    assert torch.all(modules["stages.0.1.bn2"].weight == 0)
    assert output_classes(model, (3, 32, 32)) == 100


USER_MODULE = '''
import torch
from torch import nn

class WithClasses(nn.Module):
    def __init__(self, num_classes, hidden=16, in_channels=1):
        super().__init__()
        self.in_channels = in_channels
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    def forward(self, x):
        return self.net(x)

class FixedTen(nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale
        self.fc = nn.Linear(64, 10)
    def forward(self, x):
        return self.fc(x.flatten(1)) * self.scale

class FromShape(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes)
    def forward(self, x):
        return self.fc(x.flatten(1))

CALLS = []

def make_net(input_shape, num_classes):
    CALLS.append("make_net")
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes))

class NotAModel:
    def __init__(self):
        CALLS.append("NotAModel")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_nets"


def test_user_model_gets_num_classes_and_in_channels_when_it_asks(user_module):
    model = create_model(f"{user_module}:WithClasses", (3, 8, 8), 7, hidden=32)
    assert model.in_channels == 3
    assert output_classes(model, (3, 8, 8)) == 7
    assert model.net[1].out_features == 32


def test_user_model_without_num_classes_gets_only_its_kwargs(user_module):
    model = create_model(f"{user_module}:FixedTen", (1, 8, 8), 10, scale=2.0)
    assert model.scale == 2.0
    assert output_classes(model, (1, 8, 8)) == 10


def test_user_model_gets_input_shape(user_module):
    model = create_model(f"{user_module}:FromShape", (1, 8, 8), 5)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("attr, kind", [("make_net", "a function"), ("NotAModel", "a class"), ("CALLS", "an object")])
def test_user_model_must_be_a_module_class_and_is_never_called_otherwise(user_module, attr, kind):
    # Functions are refused too: from a recipe, naming any callable would run it (os:system).
    with pytest.raises(KdistillError, match=f"{attr} is {kind}, not a subclass of torch.nn.Module"):
        create_model(f"{user_module}:{attr}", (1, 8, 8), 5)
    assert __import__(user_module).CALLS == []


def test_user_model_errors(user_module):
    with pytest.raises(KdistillError, match=r"does not take argument 'hiden'.*did you mean 'hidden'"):
        create_model(f"{user_module}:WithClasses", MNIST, 10, hiden=3)
    with pytest.raises(KdistillError, match="my_nets has no Missing; its nn.Module classes: FixedTen, FromShape"):
        create_model(f"{user_module}:Missing", MNIST, 10)
    with pytest.raises(KdistillError, match="my_nets has no WithClases; did you mean 'WithClasses'"):
        create_model(f"{user_module}:WithClases", MNIST, 10)
    with pytest.raises(KdistillError, match="cannot import.*PYTHONPATH"):
        create_model("no_such_module_xyz:Net", MNIST, 10)
    with pytest.raises(KdistillError, match="module.path:ClassName"):
        create_model("my_nets:", MNIST, 10)


def test_unknown_model_suggests_the_closest_name():
    with pytest.raises(KdistillError, match=r"unknown model 'resnt'; did you mean 'resnet'\?.*seed_teacher"):
        create_model("resnt", MNIST, 10)


def test_unknown_argument_lists_the_valid_ones():
    with pytest.raises(KdistillError, match=r"model 'mlp' does not take argument 'foo' \(it takes: hidden, dropout\)"):
        create_model("mlp", MNIST, 10, foo=1)
    with pytest.raises(KdistillError, match="does not take argument 'width'.*no arguments"):
        create_model("seed_student", MNIST, 10, width=3)


@pytest.mark.parametrize("name, shape, kwargs, message", [
    ("seed_teacher", (1, 2, 2), {}, "at least 4x4"),
    ("seed_student", (28, 28), {}, "three positive integers"),
    ("mlp", MNIST, {"hidden": "800"}, "list of positive integers"),
    ("mlp", MNIST, {"dropout": 1.0}, r"in \[0, 1\)"),
    ("resnet", MNIST, {"width": 0}, "width must be a positive integer"),
    ("resnet", MNIST, {"depth": 1.5}, "depth must be a positive integer"),
])
def test_builders_reject_bad_shapes_and_values(name, shape, kwargs, message):
    with pytest.raises(KdistillError, match=message):
        create_model(name, shape, 10, **kwargs)


def test_register_model_refuses_duplicates_and_colons():
    with pytest.raises(KdistillError, match="already registered"):
        register_model("mlp", "again")(lambda input_shape, num_classes: nn.Identity())
    with pytest.raises(KdistillError, match="':'"):
        register_model("a:b", "bad")


@pytest.mark.parametrize("training", [True, False])
def test_output_classes_restores_each_modules_mode(training):
    model = create_model("resnet", MNIST, 10, width=8, depth=1).train(training)
    frozen = model.stages[0][0].bn1.eval()  # a frozen BatchNorm must stay frozen
    assert output_classes(model, MNIST) == 10
    assert model.training is training and model.head.training is training
    assert frozen.training is False


def test_output_classes_reports_a_shape_mismatch():
    model = create_model("seed_student", MNIST, 10)
    with pytest.raises(KdistillError, match="fails on inputs of shape"):
        output_classes(model, (1, 32, 32))
