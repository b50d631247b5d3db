"""VID and CRD against RepDistiller's code, ReviewKD against mdistiller's, and term schedules.

The `official_*` functions and classes are the official computations (RepDistiller's
distiller_zoo/VID.py and crd/{criterion,memory}.py, mdistiller's distillers/ReviewKD.py),
rewritten here from reading them; ours must give the same values within 1e-5 relative.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdistill import Distiller
from kdistill import functional as KF
from kdistill.data import BatchLoader, ImageSet
from kdistill.errors import KdistillError
from kdistill.losses import DistillInputs, TermSchedule, build_objective
from kdistill.losses.features import CRD, VID, ReviewKD
from kdistill.models.registry import create_model

# -- VID -----------------------------------------------------------------------------------------


def official_vid(regressor, log_scale, eps, fs, ft):
    s_h, t_h = fs.shape[2], ft.shape[2]
    if s_h > t_h:
        fs = F.adaptive_avg_pool2d(fs, (t_h, t_h))
    elif s_h < t_h:
        ft = F.adaptive_avg_pool2d(ft, (s_h, s_h))
    pred_mean = regressor(fs)
    pred_var = torch.log(1.0 + torch.exp(log_scale)) + eps
    pred_var = pred_var.view(1, -1, 1, 1)
    return torch.mean(0.5 * ((pred_mean - ft) ** 2 / pred_var + torch.log(pred_var)))


@pytest.mark.parametrize("student_size, teacher_size", [(8, 8), (8, 4), (4, 8)])
def test_vid_matches_repdistiller(student_size, teacher_size):
    torch.manual_seed(0)
    fs, ft = torch.randn(6, 5, student_size, student_size), torch.randn(6, 7, teacher_size, teacher_size)
    term = VID("s", "t")
    term.prepare({"s": fs}, {"t": ft})
    with torch.no_grad():
        term.log_scale.add_(torch.randn(7))  # away from the common start value
    ours = term(DistillInputs(torch.zeros(6, 3), torch.zeros(6, dtype=torch.long), student_features={"s": fs},
                              teacher_features={"t": ft}))
    expected = official_vid(term.regressor, term.log_scale, 1e-5, fs, ft)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)
    # RepDistiller's start: log(exp(init_pred_var - eps) - 1), so the variance starts at 5.
    fresh = VID("s", "t")
    fresh.prepare({"s": fs}, {"t": ft})
    expected_start = np.log(np.exp(5.0 - 1e-5) - 1.0)
    torch.testing.assert_close(fresh.log_scale, torch.full((7,), float(expected_start)))


def test_vid_stays_finite_for_huge_features_and_bf16():
    mean = torch.randn(4, 3, 2, 2) * 1e4
    value = KF.vid(mean.bfloat16(), torch.zeros(4, 3, 2, 2).bfloat16(), torch.tensor([-50.0, 0.0, 50.0]))
    assert value.dtype == torch.float32 and torch.isfinite(value)


# -- CRD -----------------------------------------------------------------------------------------

def official_contrast_loss(x, n_data, eps=1e-7):
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


def official_contrast_memory(memory_v1, memory_v2, v1, v2, y, idx, temperature, z, momentum):
    """ContrastMemory.forward with the indices given; z = [Z_v1, Z_v2] (negative: set from this batch).
    Returns out_v1, out_v2, the updated memories and the constants."""
    batch, k_plus_1, dim = v1.size(0), idx.size(1), memory_v1.size(1)
    n = memory_v1.size(0)
    weight_v1 = torch.index_select(memory_v1, 0, idx.view(-1)).view(batch, k_plus_1, dim)
    out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(batch, dim, 1)), temperature))
    weight_v2 = torch.index_select(memory_v2, 0, idx.view(-1)).view(batch, k_plus_1, dim)
    out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(batch, dim, 1)), temperature))
    z = list(z)
    if z[0] < 0:
        z[0] = (out_v1.mean() * n).item()
    if z[1] < 0:
        z[1] = (out_v2.mean() * n).item()
    out_v1, out_v2 = out_v1 / z[0], out_v2 / z[1]
    memory_v1, memory_v2 = memory_v1.clone(), memory_v2.clone()
    with torch.no_grad():
        for memory, v in ((memory_v1, v1), (memory_v2, v2)):
            pos = torch.index_select(memory, 0, y.view(-1)) * momentum + v * (1 - momentum)
            memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
    return out_v1, out_v2, memory_v1, memory_v2, z


def test_crd_nce_matches_repdistillers_contrast_loss():
    torch.manual_seed(0)
    x = torch.rand(8, 1 + 20) * 3  # positive, then 20 negatives
    torch.testing.assert_close(KF.crd_nce(x.log(), 100), official_contrast_loss(x, 100).squeeze(), rtol=1e-5, atol=0)


def test_crd_stays_finite_for_extreme_scores():
    scores = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    assert torch.isfinite(KF.crd_nce(scores, 10))
    assert torch.isfinite(KF.crd_nce(scores.bfloat16(), 10))


def _crd_term(n, dim, negatives, temperature=0.07):
    term = CRD("s", "t", dim=dim, negatives=negatives, temperature=temperature)
    term.prepare({"s": torch.zeros(2, 6)}, {"t": torch.zeros(2, 9)})
    return term


def test_the_crd_term_matches_repdistiller_over_two_steps():
    """Two training steps with the same embeddings, memories and negatives as RepDistiller's CRDLoss:
    the same losses (the normalising constants set at the first), the same memory updates."""
    torch.manual_seed(0)
    n, dim, k = 40, 5, 7
    labels = torch.arange(n) % 4
    term = _crd_term(n, dim, k)
    term.bind_training_set(labels, 6)
    memory_s, memory_t, z = term.student_memory[:n].clone(), term.teacher_memory[:n].clone(), [-1.0, -1.0]
    for _ in range(2):
        index = torch.randperm(n)[:6]
        fs, ft = torch.randn(6, 6), torch.randn(6, 9)
        state = torch.get_rng_state()
        negatives = term._negatives(index)  # the draw the term will make
        torch.set_rng_state(state)
        ours = term(DistillInputs(torch.zeros(6, 4), labels[index], student_features={"s": fs},
                                  teacher_features={"t": ft}, index=index))
        # RepDistiller: Embed = linear then L2 normalisation; contrast_idx = [positive, negatives].
        v1, v2 = F.normalize(term.embed_student(fs), dim=1), F.normalize(term.embed_teacher(ft), dim=1)
        idx = torch.cat([index[:, None], negatives], 1)
        out_s, out_t, memory_s, memory_t, z = official_contrast_memory(memory_s, memory_t, v1, v2, index, idx,
                                                                       0.07, z, 0.5)
        expected = official_contrast_loss(out_s, n) + official_contrast_loss(out_t, n)
        torch.testing.assert_close(ours, expected.squeeze(), rtol=1e-5, atol=0)
        torch.testing.assert_close(term.student_memory[:n], memory_s, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(term.teacher_memory[:n], memory_t, rtol=1e-5, atol=1e-7)
        assert torch.isclose(term.log_z.exp(), torch.tensor(z), rtol=1e-5).all()


def test_crd_negatives_come_from_other_classes():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    term = _crd_term(len(labels), 4, 500)
    term.bind_training_set(labels, 10)
    index = torch.arange(len(labels))
    negatives = term._negatives(index)
    assert negatives.shape == (10, 500)
    assert (labels[negatives] != labels[index][:, None]).all()
    for i in index:  # every sample of another class is drawn
        assert set(negatives[i].tolist()) == set(torch.nonzero(labels != labels[i]).flatten().tolist())


def test_crd_needs_two_classes():
    term = _crd_term(4, 4, 3)
    with pytest.raises(ValueError, match="at least two"):
        term.bind_training_set(torch.zeros(4, dtype=torch.long), 4)


def _crd_steps(rank, world, init_file, out_dir, n, rows):
    """Rank `rank` of `world` processes (gloo): two CRD training steps on its share of each global batch
    (the rows BatchLoader gives it); its banks and Z are saved for the test to compare."""
    from safetensors.torch import save_file

    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    labels = torch.arange(n) % 3
    term = _crd_term(n, 5, 4)
    term.bind_training_set(labels, -(-rows // world))
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        index = torch.randperm(n, generator=generator)[:rows]
        fs, ft = torch.randn(rows, 6, generator=generator), torch.randn(rows, 9, generator=generator)
        share = slice(rank * rows // world, (rank + 1) * rows // world)
        term(DistillInputs(torch.zeros(rows, 4)[share], labels[index][share], student_features={"s": fs[share]},
                           teacher_features={"t": ft[share]}, index=index[share]))
    save_file({"student": term.student_memory, "teacher": term.teacher_memory, "log_z": term.log_z},
              f"{out_dir}/rank{rank}_of_{world}.safetensors")
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("rows", [8, 7])  # 7: the processes' shares differ (3 and 4 rows)
def test_crd_banks_under_two_processes_equal_one_process_banks(tmp_path, rows):
    """Every process applies every process's memory update, so the banks stay equal across processes and
    equal to one process's on the same global batches (the negatives differ, the updates do not)."""
    from safetensors.torch import load_file

    _crd_steps(0, 1, None, tmp_path, 30, rows)
    torch.multiprocessing.spawn(_crd_steps, args=(2, tmp_path / "init", tmp_path, 30, rows), nprocs=2)
    alone, *ranks = (load_file(tmp_path / f"rank{r}_of_{w}.safetensors") for r, w in ((0, 1), (0, 2), (1, 2)))
    for name in ("student", "teacher"):
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][name][:30], alone[name][:30], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ranks[0]["log_z"], ranks[1]["log_z"], rtol=0, atol=0)


# -- ReviewKD ------------------------------------------------------------------------------------

def official_hcl(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher, strict=True):
        _, _, h, _ = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for level in [4, 2, 1]:
            if level >= h:
                continue
            cnt /= 2.0
            loss += F.mse_loss(F.adaptive_avg_pool2d(fs, (level, level)), F.adaptive_avg_pool2d(ft, (level, level)),
                               reduction="mean") * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def official_abf(fusion, x, y=None, shape=None, out_shape=None):
    """mdistiller's ABF.forward over our module's weights (conv1 = reduce, conv2 = expand, att_conv = attention)."""
    n, _, h, w = x.shape
    x = fusion.reduce(x)
    if fusion.attention is not None:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = fusion.attention(torch.cat([x, y], dim=1))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    return fusion.expand(x), x


def test_hcl_matches_mdistiller():
    torch.manual_seed(0)
    pairs = [(torch.randn(3, 4, s, s), torch.randn(3, 4, s, s)) for s in (8, 4, 2, 1)]
    ours = KF.hierarchical_context_loss([p[0] for p in pairs], [p[1] for p in pairs])
    torch.testing.assert_close(ours, official_hcl([p[0] for p in pairs], [p[1] for p in pairs]), rtol=1e-5, atol=0)


def test_the_review_term_matches_mdistillers_forward():
    """mdistiller's CIFAR layout: student stage maps of 16, 8 and 4 pixels plus the pooled feature as a
    1x1 map; teacher levels of other channels (and one of another size)."""
    torch.manual_seed(0)
    student = {"a": torch.randn(2, 4, 16, 16), "b": torch.randn(2, 8, 8, 8), "c": torch.randn(2, 16, 4, 4),
               "pool": torch.randn(2, 16)}
    teacher = {"a": torch.randn(2, 6, 16, 16), "b": torch.randn(2, 12, 8, 8), "c": torch.randn(2, 24, 8, 8),
               "pool": torch.randn(2, 24)}
    term = ReviewKD(["a", "b", "c", "pool"], ["a", "b", "c", "pool"])
    term.prepare(student, teacher)
    term.eval()  # batch norm on running statistics: both sides compute the same thing either way
    ours = term(DistillInputs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), student_features=student,
                              teacher_features=teacher))
    x = [student["pool"][:, :, None, None], student["c"], student["b"], student["a"]]
    shapes, out_shapes = [1, 4, 8, 16], [1, 8, 8, 16]
    out, res = official_abf(term.fusions[0], x[0], out_shape=out_shapes[0])
    results = [out]
    for features, fusion, shape, out_shape in zip(x[1:], term.fusions[1:], shapes[1:], out_shapes[1:], strict=True):
        out, res = official_abf(fusion, features, res, shape, out_shape)
        results.insert(0, out)
    expected = official_hcl(results, [teacher["a"], teacher["b"], teacher["c"], teacher["pool"][:, :, None, None]])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)
    assert term.fusions[0].attention is None and term.fusions[-1].attention is not None
    assert term.fusions[0].reduce[0].out_channels == 16  # min(512, the deepest student level's channels)


def test_review_refuses_unpaired_levels():
    with pytest.raises(ValueError, match="as many paths"):
        ReviewKD(["a", "b"], ["a"])


# -- the terms in training ---------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:the teacher gets")  # untrained on purpose
def test_vid_crd_and_review_train_and_resume_exactly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=generator),
                    torch.randint(0, 3, (48,), generator=generator))
    loader = BatchLoader(data, 8, mean=(0.5,), std=(0.25,), shuffle=True)
    teacher = create_model("resnet", (1, 8, 8), 3, width=8, depth=1)
    losses = {"ce": {}, "vid": {"student": "stages.1", "teacher": "stages.2"},
              "crd": {"student": "stages.2", "teacher": "stages.2", "dim": 8, "negatives": 16},
              "review": {"student": ["stages.0", "stages.1", "stages.2"],
                         "teacher": ["stages.0", "stages.1", "stages.2"], "warmup_epochs": 2}}

    def distiller(init_seed=0):
        torch.manual_seed(init_seed)
        return Distiller(teacher, create_model("resnet", (1, 8, 8), 3, width=4, depth=1), build_objective(losses))

    whole = distiller()
    result = whole.fit(loader, epochs=2, lr=0.05, progress="quiet", seed=0)
    assert all(math.isfinite(result.history[-1][f"train_{label}"]) for label in losses)
    assert not torch.isnan(whole.objective.terms["crd"].log_z).any()
    first = distiller()
    first.fit(loader, epochs=1, lr=0.05, progress="quiet", seed=0, out_dir=tmp_path)
    again = distiller(init_seed=1)
    again.fit(loader, epochs=2, lr=0.05, progress="quiet", seed=0, out_dir=tmp_path, resume=True)
    for key, value in whole.objective.state_dict().items():  # the memory banks and constants too
        assert torch.equal(value, again.objective.state_dict()[key]), key
    for key, value in whole.student.state_dict().items():
        assert torch.equal(value, again.student.state_dict()[key]), key


def test_crd_refuses_a_loader_without_the_training_set():
    teacher = create_model("mlp", (1, 4, 4), 3, hidden=[8])
    student = create_model("mlp", (1, 4, 4), 3, hidden=[4])
    distiller = Distiller(teacher, student, build_objective({"crd": {"student": "body.fc1", "teacher": "body.fc1"}}))
    batches = [(torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]), torch.arange(4))]
    with pytest.raises(KdistillError, match="needs the training set's labels"):
        distiller.prepare(batches)


# -- schedules --------------------------------------------------------------------------------------

def test_term_schedules_switch_terms_and_ramp_them():
    assert [TermSchedule(warmup_epochs=4).factor(e) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [TermSchedule(until_epoch=2).factor(e) for e in range(3)] == [1.0, 1.0, 0.0]
    assert [TermSchedule(from_epoch=3, warmup_epochs=2).factor(e) for e in range(5)] == [0, 0, 0.5, 1.0, 1.0]
    objective = build_objective({"ce": {"from_epoch": 3}, "kd": {"weight": 2, "warmup_epochs": 4},
                                 "hint": {"type": "logit_mse", "until_epoch": 2}})
    inputs = DistillInputs(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), torch.tensor([[0.0, 2.0]]))
    values = {label: term(inputs) for label, term in objective.terms.items()}
    for epoch, expected in ((0, 2 * 0.25 * values["kd"] + values["hint"]),
                            (2, values["ce"] + 2 * 0.75 * values["kd"])):
        objective.set_epoch(epoch)
        total, logged = objective(inputs)
        torch.testing.assert_close(total, expected)
        assert set(logged) == {"ce", "kd", "hint"}
    assert logged["hint"] == 0  # outside its epochs: not computed, reported as 0


@pytest.mark.parametrize("spec, message", [
    ({"kd": {"until_epoch": 2}, "ce": {"from_epoch": 4}}, "no loss term counts in epoch 3 of 5"),
    ({"kd": {"from_epoch": 0}}, "distill.losses.kd.from_epoch: must be an epoch number >= 1"),
    ({"kd": {"from_epoch": 3, "until_epoch": 2}}, "until_epoch (2) comes before from_epoch (3)"),
    ({"kd": {"warmup_epochs": -1}}, "distill.losses.kd.warmup_epochs: must be a number of epochs >= 0"),
])
def test_bad_schedules_are_one_line(spec, message):
    with pytest.raises(KdistillError) as error:
        build_objective(spec, epochs=5)
    assert message in str(error.value)


def test_two_stage_fitnets_trains_the_hint_first_then_distils(tmp_path):
    """Romero et al.'s schedule as term windows: the hint alone for the first epoch, then CE + KD."""
    from kdistill.cli import main

    hint = ("distill.losses={hint: {type: fitnet, student: body.fc1, teacher: body.fc2, until_epoch: 1}, "
            "ce: {weight: 0.1, from_epoch: 2}, kd: {weight: 0.9, from_epoch: 2}}")
    assert main(["run", "digits_quick", f"out_dir={tmp_path}", "teacher.train.epochs=1", "train.epochs=3",
                 "eval.latency_repeats=1", "eval.latency_batches=[1]", hint, "--quiet"]) == 0
    import json
    history = [json.loads(line) for line in (tmp_path / "digits_quick" / "student" / "metrics.jsonl").read_text()
               .splitlines()]
    assert history[0]["train_hint"] > 0 and history[0]["train_kd"] == 0 and history[0]["train_ce"] == 0
    assert history[1]["train_hint"] == 0 and history[1]["train_kd"] > 0



@pytest.mark.filterwarnings("ignore:the teacher gets")  # untrained on purpose
def test_crds_memory_bank_has_a_row_per_training_sample_whatever_the_validation_set():
    generator = torch.Generator().manual_seed(0)
    train = ImageSet(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=generator),
                     torch.arange(40) % 3)
    val = ImageSet(train.images[:12], train.labels[:12])
    teacher = create_model("resnet", (1, 8, 8), 3, width=8, depth=1)
    objective = build_objective({"ce": {}, "crd": {"student": "stages.2", "teacher": "stages.2", "negatives": 4}})
    distiller = Distiller(teacher, create_model("resnet", (1, 8, 8), 3, width=4, depth=1), objective)
    distiller.fit(BatchLoader(train, 8, mean=(0.5,), std=(0.25,), shuffle=True), epochs=1, progress="quiet",
                  val_loader=BatchLoader(val, 6, mean=(0.5,), std=(0.25,)))
    crd = distiller.objective.terms["crd"]
    assert crd.student_memory.shape == (40 + 1, 128) and torch.equal(crd.sample_class, train.labels)  # + scratch
