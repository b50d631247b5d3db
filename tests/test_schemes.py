"""Schemes: the maths of combining teachers and of mutual learning, and every scheme end to end on digits."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fails_cleanly
from torch import nn

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.functional import combine_teachers
from kdistill.losses import build_objective
from kdistill.models import create_model
from kdistill.pipeline import Pipeline
from kdistill.schemes import run_recipe, scheme_descriptions
from kdistill.schemes.online import MutualDistiller
from kdistill.train import load_tensors

DIGITS = "recipes/digits_quick.yaml"
FAST = ["teacher.train.epochs=2", "train.epochs=2", "eval.latency_repeats=1", "eval.latency_batches=[1]"]


# -- combining teachers ----------------------------------------------------------------------------
def test_combined_teachers_are_the_mean_of_their_softened_distributions():
    torch.manual_seed(0)
    teachers = [torch.randn(5, 7) * 3 for _ in range(3)]
    for temperature in (1.0, 4.0):
        combined = combine_teachers(teachers, temperature)
        expected = torch.stack([F.softmax(t / temperature, -1) for t in teachers]).mean(0)
        torch.testing.assert_close(F.softmax(combined / temperature, -1), expected)
    # One teacher, or all weight on one: that teacher's distribution.
    torch.testing.assert_close(F.softmax(combine_teachers(teachers[:1], 2.0) / 2, -1), F.softmax(teachers[0] / 2, -1))
    only_second = combine_teachers(teachers, 4.0, "weights", [0, 2, 0])
    torch.testing.assert_close(F.softmax(only_second / 4, -1), F.softmax(teachers[1] / 4, -1))
    weighted = combine_teachers(teachers, 1.0, "weights", [1, 1, 2])
    expected = (F.softmax(teachers[0], -1) + F.softmax(teachers[1], -1) + 2 * F.softmax(teachers[2], -1)) / 4
    torch.testing.assert_close(F.softmax(weighted, -1), expected)


def test_confidence_weights_each_sample_by_the_teachers_entropies():
    sure = torch.tensor([[8.0, 0.0, 0.0]])  # a confident teacher
    unsure = torch.tensor([[0.1, 0.0, 0.2]])  # an almost uniform one
    p = [F.softmax(t, -1)[0].tolist() for t in (sure, unsure)]
    entropies = [-sum(x * math.log(x) for x in row) for row in p]
    weights = [math.exp(-h) / sum(math.exp(-g) for g in entropies) for h in entropies]  # softmax(-H)
    expected = [weights[0] * a + weights[1] * b for a, b in zip(*p, strict=True)]
    combined = F.softmax(combine_teachers([sure, unsure], 1.0, "confidence"), -1)[0]
    torch.testing.assert_close(combined, torch.tensor(expected))
    assert weights[0] > 0.5 and combined[0] > (p[0][0] + p[1][0]) / 2  # the confident teacher weighs more
    # Per sample: swapping which teacher is sure on the second sample swaps the weights there.
    both = combine_teachers([torch.cat([sure, unsure]), torch.cat([unsure, sure])], 1.0, "confidence")
    torch.testing.assert_close(F.softmax(both, -1)[0], F.softmax(both, -1)[1])


@pytest.mark.parametrize("kwargs, message", [
    ({"combine": "max"}, "combine must be one of"),
    ({"combine": "weights", "weights": [1.0]}, "needs 2 finite weights"),
    ({"combine": "weights", "weights": [1.0, -1.0]}, "needs 2 finite weights"),
    ({"combine": "weights", "weights": [0.0, 0.0]}, "not all 0"),
    ({"temperature": 0.0}, "temperature must be"),
])
def test_combine_teachers_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        combine_teachers([torch.zeros(2, 3), torch.zeros(2, 3)], **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        combine_teachers([torch.zeros(2, 3), torch.zeros(2, 4)])


def test_the_ensemble_model_loads_its_members_from_one_file(tmp_path):
    members = [{"name": "mlp", "kwargs": {"hidden": [8]}}, {"name": "seed_student"}]
    ensemble = create_model("ensemble", (1, 28, 28), 10, members=members, temperature=2.0)
    x = torch.randn(4, 1, 28, 28)
    expected = combine_teachers([m(x) for m in ensemble.members], 2.0)
    torch.testing.assert_close(ensemble(x), expected)
    assert len(ensemble.member_configs) == 2 and "mlp" in ensemble.member_configs[0]


# -- mutual learning -------------------------------------------------------------------------------
def _peers(count=3):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Flatten(), nn.Linear(12, 5)) for _ in range(count)]


def test_each_peer_learns_from_the_others_outputs_of_the_same_step():
    """The gradient of every peer is that of its own objective against the others' detached outputs:
    CE + the mean over the other peers of KD (Zhang et al. 2018), all from one forward pass each."""
    models = _peers(3)
    losses = {"ce": {"weight": 1}, "kd": {"weight": 1, "temperature": 1}}
    distiller = MutualDistiller(models, [losses] * 3)
    x, y = torch.randn(6, 1, 3, 4), torch.randint(0, 5, (6,))
    loss, logits, terms = distiller.training_step(x, y)
    loss.backward()
    assert set(terms) == {f"peer{k}.{t}" for k in (1, 2, 3) for t in ("ce", "kd")}
    reference = [m(x) for m in models]
    for k, model in enumerate(models):
        others = [reference[j].detach() for j in range(3) if j != k]
        own = F.cross_entropy(reference[k], y) + sum(
            F.kl_div(F.log_softmax(reference[k], -1), F.softmax(t, -1), reduction="batchmean") for t in others) / 2
        grads = torch.autograd.grad(own, list(model.parameters()))
        for param, grad in zip(model.parameters(), grads, strict=True):
            torch.testing.assert_close(param.grad, grad)
    torch.testing.assert_close(logits, reference[0])


def test_a_teacher_trained_alongside_learns_from_the_labels_only():
    teacher, student = _peers(2)
    distiller = MutualDistiller([teacher, student], [{"ce": {}}, {"ce": {"weight": 0.5}, "kd": {"weight": 0.5}}],
                                teachers=[[], [0]], names=["teacher", "student"], kept=1)
    x, y = torch.randn(6, 1, 3, 4), torch.randint(0, 5, (6,))
    loss, logits, _ = distiller.training_step(x, y)
    loss.backward()
    grads = torch.autograd.grad(F.cross_entropy(teacher(x), y), list(teacher.parameters()))
    for param, grad in zip(teacher.parameters(), grads, strict=True):
        torch.testing.assert_close(param.grad, grad)
    torch.testing.assert_close(logits, student(x))
    with pytest.raises(Exception, match="learns from no other model"):
        MutualDistiller([teacher, student], [{"kd": {}}, {"ce": {}}], teachers=[[], [0]])


def _loader(stop_at_epoch=None):
    """A small shuffled loader; with `stop_at_epoch`, interrupted (as by Ctrl-C) when that epoch starts."""
    from kdistill.data import BatchLoader
    from kdistill.data.sets import ImageSet

    class Interrupted(BatchLoader):
        def set_epoch(self, epoch, start_step=0):
            if epoch == stop_at_epoch:
                raise KeyboardInterrupt
            super().set_epoch(epoch, start_step)

    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (64, 1, 3, 4), dtype=torch.uint8, generator=g),
                    torch.randint(0, 5, (64,), generator=g))
    return Interrupted(data, 16, mean=[0.5], std=[0.25], shuffle=True, seed=0)


def test_models_trained_together_keep_their_own_optimizers_and_resume_exactly(tmp_path):
    """SGD with a cosine schedule for one, Adam with clipping for the other: an interrupted training, resumed,
    ends with the weights of an uninterrupted one (both optimizers' states are saved and restored)."""
    from kdistill.config.loading import train_config

    configs = [train_config(epochs=1, optimizer="sgd", lr=0.1, momentum=0.9, schedule="cosine"),
               train_config(epochs=1, optimizer="adam", lr=0.01, grad_clip=1.0)]

    def trained(out, resume=False, stop_at_epoch=None):
        distiller = MutualDistiller(_peers(2), train_configs=configs)
        distiller.fit(_loader(stop_at_epoch), 3, out_dir=out, resume=resume, progress="quiet", seed=3)
        return distiller

    straight = trained(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        trained(tmp_path / "b", stop_at_epoch=2)
    meta = load_tensors(tmp_path / "b" / "train_state.safetensors")[1]
    assert json.loads(meta["optimizer"])["param_groups"][0]["momentum"] == 0.9  # SGD's
    assert "betas" in json.loads(meta["optimizer1"])["param_groups"][0]  # Adam's
    resumed = trained(tmp_path / "b", resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- the schemes, end to end on digits ---------------------------------------------------------------
def test_list_schemes(capsys):
    assert main(["list", "schemes"]) == 0
    out = capsys.readouterr().out
    for name in ("offline", "online", "self", "multi_teacher", "assistant"):
        assert name in out and name in scheme_descriptions()


def test_an_assistant_chain_is_a_chain_of_ordinary_runs(tmp_path, soft_label_cache):
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}", *FAST, "scheme=assistant",
                               "assistant.chain=[{name: mlp, kwargs: {hidden: [64]}}]"])
    metrics = run_recipe(cfg, progress="quiet")
    assert metrics["rows"] == ["teacher", "assistant1", "assistant1_scratch", "baseline", "student"]
    folder = tmp_path / "digits_quick"
    link2 = load_config(folder / "link2" / "config.yaml")
    assert link2.teacher.checkpoint == str(folder / "link1" / "student" / "model.safetensors")
    assert link2.teacher.kwargs.hidden == [64] and link2.student.kwargs.hidden == [16]
    assert metrics["student"]["test_accuracy"] > 0.5 and (folder / "report.md").exists()
    # Each link is an ordinary run folder: its own report, its teacher's soft labels cached.
    assert (folder / "link1" / "report.md").exists() and len(list(soft_label_cache.glob("*.safetensors"))) == 2
    # Run again: everything is reused.
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("model.safetensors")}
    run_recipe(cfg, progress="quiet")
    assert before == {p: p.stat().st_mtime_ns for p in folder.rglob("model.safetensors")}


def test_born_again_generation_zero_is_the_baseline(tmp_path, soft_label_cache):
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}", *FAST, "scheme=self", "self_distill.generations=2"])
    metrics = run_recipe(cfg, progress="quiet")
    assert metrics["rows"] == ["teacher", "gen1", "student", "ensemble"]
    assert metrics["baseline"]["test_accuracy"] == metrics["teacher"]["test_accuracy"]
    gen1 = tmp_path / "digits_quick" / "gen1"
    assert load_tensors(gen1 / "teacher" / "model.safetensors")[0].keys() == \
        load_tensors(gen1 / "baseline" / "model.safetensors")[0].keys()
    # Taking the baseline as generation 0 is exact: a teacher of the student's architecture trained with
    # the student's training, in an ordinary run, has the baseline's weights.
    offline = load_config(DIGITS, [f"out_dir={tmp_path}", "name=plain", *FAST, "teacher.name=mlp",
                                   "teacher.kwargs={hidden: [16]}", "teacher.train.epochs=2"])
    with Pipeline(offline, progress="quiet", trains=("teacher", "baseline")) as pipeline:
        teacher, baseline = pipeline.model("teacher"), pipeline.model("baseline")
    for a, b in zip(teacher.state_dict().values(), baseline.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    gen2 = load_config(tmp_path / "digits_quick" / "gen2" / "config.yaml")
    assert gen2.teacher.checkpoint == str(gen1 / "student" / "model.safetensors")


def test_multi_teacher_combines_each_teachers_own_cache_entry(tmp_path, soft_label_cache):
    teachers = "multi_teacher.teachers=[{name: mlp, kwargs: {hidden: [32]}}, {name: seed_teacher}]"
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}", *FAST, "scheme=multi_teacher", teachers,
                               "multi_teacher.combine=confidence"])
    metrics = run_recipe(cfg, progress="quiet")
    assert metrics["rows"] == ["teacher1", "teacher2", "teacher", "baseline", "student"]
    assert metrics["teacher"]["model"] == "ensemble"
    entries = sorted(soft_label_cache.glob("*.safetensors"))
    assert len(entries) == 2  # one per teacher, none for the combination
    # Each entry is the one an offline run with that teacher alone reads.
    folder = tmp_path / "digits_quick"
    alone = load_config(DIGITS, [f"out_dir={tmp_path}", "name=alone", *FAST, "teacher.name=seed_teacher",
                                 "teacher.kwargs={}",
                                 f"teacher.checkpoint={folder / 'teacher2' / 'teacher' / 'model.safetensors'}"])
    with Pipeline(alone, progress="quiet", trains=()) as pipeline:
        _, path, built, _ = pipeline.soft_labels()
    assert not built and path in entries
    ensemble = load_tensors(folder / "ensemble.safetensors")[0]
    assert any(k.startswith("members.1.") for k in ensemble)


@pytest.mark.parametrize("mode, rows", [("mutual", ["student", "peer2", "ensemble", "baseline"]),
                                        ("teacher", ["teacher", "student", "baseline"])])
def test_online_trains_the_models_together(tmp_path, soft_label_cache, mode, rows):
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}", *FAST, "scheme=online", f"online.mode={mode}"])
    metrics = run_recipe(cfg, progress="quiet")
    assert metrics["rows"] == rows
    folder = tmp_path / "digits_quick" / "online"
    assert (folder / "student.safetensors").exists() and not (folder / "train_state.safetensors").exists()
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and "train_student.kd" in history[0]
    assert not list(soft_label_cache.glob("*.safetensors"))  # nothing cached: the teachers are live
    before = (folder / "model.safetensors").stat().st_mtime_ns
    run_recipe(cfg, progress="quiet")
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


# -- bad input: one line, exit code 2, before anything trains ---------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["scheme=mutual"], "scheme: 'mutual' is not one of offline"),
    (["scheme=assistant"], "assistant.chain is empty"),
    (["scheme=assistant", "teacher.checkpoint=/nonexistent/teacher.safetensors"], "assistant.chain is empty"),
    (["scheme=assistant", "assistant.chain=[{name: mlp}]", "teacher.checkpoint=/nonexistent/t.safetensors"],
     "teacher.checkpoint: /nonexistent/t.safetensors not found"),
    (["scheme=assistant", "assistant.chain=[{name: mlp, kwargs: {hidden: [-3]}}]"], "assistant.chain[0]"),
    (["scheme=multi_teacher", "multi_teacher.teachers=[{name: mlp}]"], "lists 1 teachers: give 2 to"),
    (["scheme=multi_teacher", "multi_teacher.teachers=[{name: mlp}, {name: mlp}]", "multi_teacher.combine=weights",
      "multi_teacher.weights=[1]"], "one weight >= 0 per teacher (2)"),
    (["scheme=multi_teacher", "multi_teacher.teachers=[{name: mlp}, {name: mlp, checkpoint: /no/such.safetensors}]"],
     "multi_teacher.teachers[1].checkpoint: /no/such.safetensors not found"),
    (["scheme=multi_teacher", "multi_teacher.teachers=[{name: mlp}, {name: mlp}]",
      "distill.losses.hint={type: fitnet, student: body.fc1, teacher: body.fc1}"], "combines the teachers' outputs"),
    (["scheme=online", "online.mode=teacher", "teacher.checkpoint=x.safetensors"], "drop teacher.checkpoint"),
    (["scheme=online", "distill.losses={ce: {}}"], "nothing would be distilled"),
    (["scheme=self", "self_distill.generations=0"], "self_distill.generations"),
])
def test_bad_scheme_settings(capsys, tmp_path, overrides, expected):
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, *overrides], expected)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_multi_teacher_teachers_that_disagree_on_the_class_count(capsys, tmp_path, monkeypatch):
    (tmp_path / "multi_teacher_five_classes.py").write_text(
        "from torch import nn\n"
        "class Five(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))\n"
        "    def forward(self, x):\n"
        "        return self.net(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, "scheme=multi_teacher",
                           "multi_teacher.teachers=[{name: mlp}, {name: 'multi_teacher_five_classes:Five'}]"],
                  "multi_teacher.teachers[1] 'multi_teacher_five_classes:Five' outputs 5 classes but digits has 10")
    assert not any(tmp_path.rglob("*.safetensors"))


def test_a_folder_of_one_scheme_is_not_reused_by_another(capsys, tmp_path, soft_label_cache):
    assert main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, "scheme=self", "self_distill.generations=1",
                 "--quiet"]) == 0
    capsys.readouterr()
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST], "holds a run of scheme self")
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, "scheme=online"],
                  "holds a run of scheme self, not online")
    fails_cleanly(capsys, ["distill", DIGITS, f"out_dir={tmp_path}", *FAST, "scheme=self"],
                  "runs whole with `kdistill run`")


def test_objectives_of_peers_refuse_feature_terms():
    with pytest.raises(Exception, match="response terms"):
        MutualDistiller(_peers(2), [build_objective({"hint": {"type": "fitnet", "student": "1",
                                                             "teacher": "1"}})] * 2)


# -- self-distillation with exits (Be Your Own Teacher) ----------------------------------------------
def test_exit_losses_follow_the_official_formula():
    from kdistill.schemes.exits import SelfDistiller, exit_feature_loss

    a, b = torch.randn(4, 6), torch.randn(4, 6)
    official = ((a - b) ** 2 * ((a > 0) | (b > 0)).float()).sum()  # luanyunteng's feature_loss_function
    torch.testing.assert_close(exit_feature_loss(a, b), official / 4)  # here per sample, averaged over the batch
    torch.manual_seed(0)
    model = create_model("mlp", (1, 4, 4), 5, hidden=[12, 8])
    distiller = SelfDistiller(model, ["body.fc1"], alpha=0.3, temperature=3.0, feature_weight=0.01)
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 5, (6,))
    distiller.prepare([(x, y)])
    loss, logits, terms = distiller.training_step(x, y)
    # Independently: the exit's head on fc1's output, taught by the deepest output and the last Linear's input.
    hidden1 = model.body.fc1(x.flatten(1))
    deep_feature = model.body.relu2(model.body.fc2(model.body.relu1(hidden1)))
    deep = model.head(deep_feature)
    head = distiller.objective.heads["body_fc1"]
    embedding, exit_logits = head(hidden1)
    soft = F.softmax(deep.detach() / 3, -1)
    kd = 9 * (soft * (soft.log() - F.log_softmax(exit_logits / 3, -1))).sum(-1).mean()
    expected = 0.7 * F.cross_entropy(deep, y) + 0.7 * F.cross_entropy(exit_logits, y) + 0.3 * kd + \
        0.01 * ((embedding - deep_feature.detach()) ** 2 * ((embedding > 0) | (deep_feature > 0))).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, deep)
    assert set(terms) == {"deepest.ce", "body.fc1.ce", "body.fc1.kd", "body.fc1.feature"}


def test_an_early_exit_stops_the_forward_pass_at_its_tap():
    from kdistill.schemes.exits import SelfDistiller

    model = create_model("resnet", (1, 8, 8), 10, width=4, depth=1, stages=3)
    distiller = SelfDistiller(model, ["stages.0"])
    x = torch.randn(3, 1, 8, 8)
    distiller.prepare([(x, None)])
    exit_model = distiller.exit_models()["stages.0"].eval()
    ran = []
    model.stages[1].register_forward_hook(lambda *_: ran.append("stages.1"))
    logits = exit_model(x)
    assert logits.shape == (3, 10) and not ran  # the deeper stages never ran
    feature = model.stages[0](model.stem(x))
    torch.testing.assert_close(logits, distiller.objective.heads["stages_0"](feature)[1])
    assert model(x).shape == (3, 10) and ran == ["stages.1"]  # the model itself is unchanged
    assert exit_model.used_parameters((1, 8, 8)) < sum(p.numel() for p in model.parameters()) + \
        sum(p.numel() for p in distiller.objective.heads.parameters())


def test_exits_on_digits_report_each_exit(tmp_path, soft_label_cache):
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}", *FAST, "scheme=self", "self_distill.mode=exits",
                               "self_distill.exits=[body.fc1]", "student.kwargs={hidden: [32, 16]}"])
    metrics = run_recipe(cfg, progress="quiet")
    assert metrics["rows"] == ["student", "exit1", "baseline"]
    folder = tmp_path / "digits_quick" / "exits"
    # The exported student is the plain network: it loads into the model as built, without the heads.
    with Pipeline(load_config(folder.parent / "scratch" / "config.yaml"), progress="quiet", claim=False) as p:
        from kdistill.train import load_model

        load_model(folder / "model.safetensors", p.build("student"))
    assert any(k.startswith("heads.body_fc1.") for k in load_tensors(folder / "objective.safetensors")[0])
    before = (folder / "model.safetensors").stat().st_mtime_ns
    again = run_recipe(cfg, progress="quiet")  # reused, and the same figures
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    assert again["exit1"]["test_accuracy"] == metrics["exit1"]["test_accuracy"]


def test_an_exit_on_a_missing_layer_is_refused(capsys, tmp_path):
    fails_cleanly(capsys, ["run", DIGITS, f"out_dir={tmp_path}", *FAST, "scheme=self", "self_distill.mode=exits",
                           "self_distill.exits=[body.fc9]"], "no module 'body.fc9' in MLP for self_distill.exits")
    assert not any(tmp_path.rglob("*.safetensors"))


@pytest.mark.parametrize("overrides", [["scheme=assistant", "assistant.chain=[{name: mlp, kwargs: {hidden: [32]}}]"],
                                       ["scheme=online"]])
def test_schemes_run_in_two_processes(tmp_path, soft_label_cache, overrides):
    """Under --nproc 2 every part trains with DDP and rank 0 alone writes: the other process waits for a
    link's files before reading them (it once read link 1's student before rank 0 had written it)."""
    assert main(["run", DIGITS, f"out_dir={tmp_path}", *FAST, *overrides, "--nproc", "2", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "digits_quick" / "metrics.json").read_text())
    assert metrics["student"]["test_accuracy"] > 0.2


def test_exits_train_from_python_with_the_one_loop(tmp_path):
    from kdistill.schemes.exits import SelfDistiller

    torch.manual_seed(0)
    exits = SelfDistiller(create_model("mlp", (1, 3, 4), 5, hidden=[16, 8]), ["body.fc1"])
    result = exits.fit(_loader(), 2, val_loader=_loader(), out_dir=tmp_path, progress="quiet")
    assert len(result.history) == 2 and "train_body.fc1.kd" in result.history[0]
    assert exits.exit_models()["body.fc1"](torch.randn(2, 1, 3, 4)).shape == (2, 5)
