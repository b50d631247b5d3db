import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from kdistill.config import load_config
from kdistill.errors import KdistillError

SEED_RECIPE = "recipes/seed_fashion_mnist.yaml"


def test_seed_recipe_matches_seed_000():
    cfg = load_config(SEED_RECIPE)
    assert cfg.distill.temperature == 4.0
    assert cfg.distill.losses.ce.weight == 0.5 and cfg.distill.losses.kd.weight == 0.5
    for train in (cfg.train, cfg.teacher.train):
        assert (train.optimizer, train.lr, train.batch_size, train.epochs) == ("adam", 0.01, 128, 5)
    assert (cfg.teacher.name, cfg.student.name) == ("seed_teacher", "seed_student")


def test_overrides_apply_and_config_is_read_only():
    cfg = load_config(SEED_RECIPE, ["distill.temperature=8", "student.name=mlp", "student.kwargs.hidden=[800,800]"])
    assert cfg.distill.temperature == 8.0
    assert cfg.student.name == "mlp" and list(cfg.student.kwargs.hidden) == [800, 800]
    with pytest.raises(ReadonlyConfigError):
        cfg.distill.temperature = 2.0


def test_empty_losses_mean_seed_objective():
    cfg = load_config(None, [])
    assert OmegaConf.to_container(cfg.distill.losses) == {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.tempreature=3", "distill.tempreature: unknown key; did you mean distill.temperature?"),
        ("train.augment.hflp=true", "did you mean train.augment.hflip?"),
        ("trian.epochs=3", "did you mean train?"),
        ("distill.temperature=hot", "distill.temperature: wrong type"),
        ("train.epochs=2.5", "train.epochs: wrong type"),
        ("distill.temperature=0", "distill.temperature: must be >= 0.01"),
        ("distill.temperature=-1", "distill.temperature: must be >= 0.01"),
        ("train.epochs=0", "train.epochs: must be >= 1"),
        ("teacher.train.batch_size=0", "teacher.train.batch_size: must be >= 1"),
        ("train.optimizer=adagrad", "train.optimizer: 'adagrad' is not one of sgd, adam, adamw"),
        ("distill.losses.tang.alpha=1.5", "distill.losses.tang: alpha must be in [0, 1], got 1.5"),
        ("distill.losses.kd.temperature=0", "distill.losses.kd: temperature must be >= 0.01"),
        ("distill.losses.kd.tempreture=2", "did you mean distill.losses.kd.temperature?"),
        ("distill.losses.kd.weight=-1", "distill.losses.kd.weight: must be a number >= 0"),
        ("distill.losses.kl.weight=1", "distill.losses.kl: unknown loss 'kl'; did you mean 'kd'?"),
        ("distill.losses.ce.label_smoothing=1.0", "label_smoothing must be in [0, 1)"),
        ("temperature", "is not key=value"),
    ],
)
def test_bad_input_is_one_clear_line(override, expected):
    with pytest.raises(KdistillError) as err:
        load_config(SEED_RECIPE, [override])
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_missing_and_malformed_recipes(tmp_path):
    with pytest.raises(KdistillError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(KdistillError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("distill:\n  temprature: 2\n")
    with pytest.raises(KdistillError, match="did you mean distill.temperature"):
        load_config(typo)
