"""DINOLoss and the DINO method: a naive reference, the centre once per optimizer step (micro-batches
and two gloo ranks give one process's loss, gradients and centre), multi-crop, and sslp seeing it."""

from __future__ import annotations

import math

import pytest
import torch
from checks import losses_on_a_fixed_batch
from gloo import run_on_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models import distributed
from ssl_models.losses import DINOLoss
from ssl_models.methods.dino import DINO, GLOBAL_VIEWS, LOCAL_VIEWS


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other jobs; these models are tiny
    yield
    torch.set_num_threads(threads)


def naive_dino_loss(student: list[list[list[float]]], teacher: list[list[list[float]]], center: list[float],
                    teacher_temp: float, student_temp: float) -> float:
    """The paper's loss written out (Caron et al. 2021, algorithm 1 and the official code): for each
    global view t and each other view s, the batch mean of -sum_k P_t[k] log P_s[k], with
    P_t = softmax((t - center) / teacher_temp) and P_s = softmax(s / student_temp); then the mean
    over those (t, s) pairs. student[v][i] and teacher[v][i] are view v of image i."""

    def softmax(logits: list[float]) -> list[float]:
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        return [e / sum(exps) for e in exps]

    pair_means = []
    for t, teacher_view in enumerate(teacher):
        for s, student_view in enumerate(student):
            if s == t:
                continue
            total = 0.0
            for t_row, s_row in zip(teacher_view, student_view, strict=True):
                p_t = softmax([(x - c) / teacher_temp for x, c in zip(t_row, center, strict=True)])
                p_s = softmax([x / student_temp for x in s_row])
                total -= sum(p * math.log(q) for p, q in zip(p_t, p_s, strict=True))
            pair_means.append(total / len(teacher_view))
    return sum(pair_means) / len(pair_means)


def outputs(batch: int, views: int, dim: int, seed: int) -> torch.Tensor:
    """(views * batch, dim) float64 head outputs, view-major, cosines in [-1, 1] like DINOHead's."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(views * batch, dim, generator=g, dtype=torch.float64) * 2 - 1


def by_view(x: torch.Tensor, views: int) -> list[list[list[float]]]:
    return [chunk.tolist() for chunk in x.chunk(views)]


# ----------------------------------------------------------------------------- DINOLoss, one process

@pytest.mark.parametrize("batch, views, dim", [(1, 2, 3), (3, 4, 8), (5, 6, 16)])
@pytest.mark.parametrize("temps", [(0.04, 0.1), (1.0, 1.0)])
def test_dino_loss_matches_naive_reference(batch, views, dim, temps):
    student, teacher = outputs(batch, views, dim, seed=batch), outputs(batch, 2, dim, seed=batch + 1)
    loss_fn = DINOLoss(dim, *temps)
    loss_fn.center.copy_(outputs(1, 1, dim, seed=7))  # a centre that is not zero
    loss = loss_fn(student, teacher)
    assert loss.shape == () and loss.dtype == torch.float64
    want = naive_dino_loss(by_view(student, views), by_view(teacher, 2), loss_fn.center[0].tolist(), *temps)
    assert loss.item() == pytest.approx(want, abs=1e-10)


def test_centre_moves_once_per_update_by_the_teachers_mean():
    dim = 6
    loss_fn = DINOLoss(dim, center_momentum=0.9)
    first, second = outputs(4, 2, dim, seed=1), outputs(4, 2, dim, seed=2)
    loss_fn(outputs(4, 3, dim, seed=3), first)
    assert torch.equal(loss_fn.center, torch.zeros(1, dim))  # forward only accumulates
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center, 0.1 * first.mean(0, keepdim=True).float(), rtol=0, atol=1e-7)
    loss_fn(outputs(4, 3, dim, seed=4), second)
    loss_fn.update_center()
    want = 0.9 * 0.1 * first.mean(0) + 0.1 * second.mean(0)  # the paper's EMA, step by step
    torch.testing.assert_close(loss_fn.center[0], want.float(), rtol=0, atol=1e-7)
    loss_fn.update_center()  # no forward since: the centre stays
    torch.testing.assert_close(loss_fn.center[0], want.float(), rtol=0, atol=1e-7)
    loss_fn.eval()
    loss_fn(outputs(4, 3, dim, seed=5), second)  # evaluation does not move it either
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center[0], want.float(), rtol=0, atol=1e-7)


def test_accumulated_micro_batches_give_the_whole_batch_loss_gradient_and_centre():
    # What the training loop does with train.grad_accum_steps=2: two forwards of B/2, each loss / 2,
    # then on_train_step_end once. The same loss, gradient and centre as one forward of B.
    batch, views, dim = 8, 4, 5
    student_in, teacher = outputs(batch, views, 10, seed=1), outputs(batch, 2, dim, seed=2)
    torch.manual_seed(0)
    head = nn.Linear(10, dim).double()
    whole_loss_fn, micro_loss_fn = DINOLoss(dim).double(), DINOLoss(dim).double()
    whole = whole_loss_fn(head(student_in), teacher)
    whole.backward()
    whole_grad, head.weight.grad = head.weight.grad.clone(), None
    whole_loss_fn.update_center()
    micro_total = 0.0
    for half in (slice(0, batch // 2), slice(batch // 2, batch)):
        s, t = (torch.cat([c[half] for c in x.chunk(v)]) for x, v in ((student_in, views), (teacher, 2)))
        loss = micro_loss_fn(head(s), t) / 2  # this half of every view
        loss.backward()
        micro_total += loss.item()
    micro_loss_fn.update_center()
    assert micro_total == pytest.approx(whole.item(), abs=1e-12)
    torch.testing.assert_close(head.weight.grad, whole_grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(micro_loss_fn.center, whole_loss_fn.center, rtol=0, atol=1e-14)


def test_dino_loss_decreases_under_sgd_and_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(16, 10)
    views = [x + 0.3 * torch.randn_like(x) for _ in range(4)]
    student = nn.Linear(10, 8)
    teacher = nn.Linear(10, 8).requires_grad_(False)
    loss_fn = DINOLoss(8)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for _ in range(40):
        loss = loss_fn(student(torch.cat(views)), teacher(torch.cat(views[:2])))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_fn.update_center()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, t = student(torch.cat(views)), teacher(torch.cat(views[:2]))
        under_autocast = loss_fn(s, t)
    assert s.dtype == torch.bfloat16 and under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, loss_fn(s.float(), t.float()))


def test_dino_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one K"):
        DINOLoss(4)(torch.randn(8, 4), torch.randn(4, 5))
    with pytest.raises(ValueError, match="2 views"):
        DINOLoss(4)(torch.randn(9, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="V >= 2 views"):
        DINOLoss(4)(torch.randn(7, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="temperatures"):
        DINOLoss(4, teacher_temp=0.0)
    assert distributed.world_size() == 1
    assert torch.equal(distributed.all_reduce_sum(torch.ones(3)), torch.ones(3))  # no process group: itself


# ----------------------------------------------------------------------------- two gloo processes

WORLD, BATCH, VIEWS, DIM = 2, 8, 4, 6  # global batch of BATCH images; rank r takes [r*B, (r+1)*B)


def _tiny_pair() -> tuple[nn.Module, nn.Module]:
    """A float64 student and teacher, no BatchNorm (its statistics would depend on the split)."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, DIM)).double()
    teacher = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, DIM)).double().requires_grad_(False)
    return student, teacher


def _steps(student: nn.Module, teacher: nn.Module, rows: slice) -> dict:
    """Two optimizer steps' worth of DINO: loss and gradient at each, the centre after each update.
    The second step's loss uses the centre the first moved, so it checks that one too."""
    loss_fn = DINOLoss(DIM, center_momentum=0.5).double()
    out = {"loss": [], "grads": [], "center": []}
    for step in range(2):
        x = outputs(BATCH, VIEWS, 10, seed=10 + step)
        views = [v[rows] for v in x.chunk(VIEWS)]
        loss = loss_fn(student(torch.cat(views)), teacher(torch.cat(views[:2])))
        student.zero_grad()
        loss.backward()
        module = student.module if isinstance(student, DistributedDataParallel) else student
        out["loss"].append(loss.detach())
        out["grads"].append({n: p.grad.clone() for n, p in module.named_parameters()})
        loss_fn.update_center()
        out["center"].append(loss_fn.center.clone())
    return out


def _worker(rank: int) -> dict:
    b = BATCH // WORLD
    student, teacher = _tiny_pair()
    return _steps(DistributedDataParallel(student), teacher, slice(rank * b, (rank + 1) * b))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("gloo_dino"), world=WORLD)


def test_two_ranks_give_the_single_process_loss_gradients_and_centre(ranks):
    whole = _steps(*_tiny_pair(), slice(0, BATCH))
    assert whole["center"][0].abs().max() > 1e-2  # the centre moved
    for step in range(2):
        torch.testing.assert_close(torch.stack([r["loss"][step] for r in ranks]).mean(), whole["loss"][step],
                                   rtol=0, atol=1e-12)
        for r in ranks:  # after DDP's average, every rank's gradient is the whole batch's
            for name, want in whole["grads"][step].items():
                torch.testing.assert_close(r["grads"][step][name], want, rtol=0, atol=1e-12, msg=name)
            # the all-reduced centre: the whole batch's, on every rank
            torch.testing.assert_close(r["center"][step], whole["center"][step], rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- the DINO method

TINY = {"in_channels": 3, "encoder_widths": [8, 16], "head_width": 32, "bottleneck_dim": 16, "out_dim": 64}


def multi_crop_batch(batch: int = 4, side: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"view{i + 1}": torch.rand(batch, 3, *(2 * (side if i < GLOBAL_VIEWS else side // 2,)), generator=g)
            for i in range(GLOBAL_VIEWS + LOCAL_VIEWS)}


def test_dino_forward_backward_and_step_end():
    torch.manual_seed(0)
    method = DINO(**TINY, head_batchnorm=True)
    calls = []
    method.encoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    out = method(multi_crop_batch())
    assert calls == [(8, 3, 16, 16), (16, 3, 8, 8)]  # once per resolution: 2 globals, then 4 locals
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert 0 <= out["teacher_entropy"].item() <= math.log(64) + 1e-6
    out["loss"].backward()
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    assert all(not n.startswith("teacher_") for n in trainable)
    assert not [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert "head.last_layer.parametrizations.weight.original0" not in trainable  # prototype norms fixed at 1

    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.1)  # an optimizer step: the teacher now lags the student
    teacher_before = {k: v.clone() for k, v in method.teacher_encoder.state_dict().items()}
    method.on_train_step_end(step=0, max_steps=10)  # tau = momentum_base
    p_student, p_teacher = method.encoder.stem[0].weight, method.teacher_encoder.stem[0].weight
    torch.testing.assert_close(p_teacher, 0.996 * teacher_before["stem.0.weight"] + 0.004 * p_student)
    assert method.criterion.center.abs().sum() > 0  # the forward's teacher rows moved the centre
    last = {k: v.clone() for k, v in method.state_dict().items()}
    method.on_train_step_end(step=9, max_steps=10)  # tau = 1 and no forward since: nothing moves
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in last.items())
    # The centre is state: a checkpoint carries it and a fresh method loads it back.
    fresh = DINO(**TINY, head_batchnorm=True)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.criterion.center, method.criterion.center)


def test_dino_embeds_with_the_student_encoder_and_rejects_bad_batches():
    method = DINO(**TINY).eval()
    images = torch.rand(5, 3, 16, 16)
    assert torch.equal(method.embed({"image": images}), method.encoder(images))
    batch = multi_crop_batch()
    with pytest.raises(ValueError, match="view6"):
        method({k: v for k, v in batch.items() if k != "view6"})
    with pytest.raises(ValueError, match="one batch"):
        method({**batch, "view4": batch["view4"][:2]})


def test_dino_learns_a_fixed_batch():
    # The student matches the teacher: the loss falls well below its start at log K.
    torch.manual_seed(0)
    method = DINO(**TINY, head_batchnorm=True)
    losses = losses_on_a_fixed_batch(method, multi_crop_batch(batch=16))
    assert losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------- what sslp sees

def test_sslp_sees_dino_and_its_multi_crop_views_from_its_spec_alone(capsys):
    from ssl_platform import cli, methods
    from ssl_platform.config import load_config
    from ssl_platform.views import image_views

    spec = methods.method_spec("dino")
    assert spec is DINO.spec and spec.display_name == "DINO" and spec.data_kind == "image"
    assert spec.batch_keys == ("view1", "view2", "view3", "view4", "view5", "view6")
    cfg = methods.validate(load_config("dino-digits"))
    views = image_views(cfg, spec.views)
    side = cfg.data.image_size
    assert [v.size for v in views] == [side, side] + [round(side / 2)] * LOCAL_VIEWS
    assert [(v.crop_scale_min, v.crop_scale_max) for v in views[GLOBAL_VIEWS:]] == [(0.05, 0.4)] * LOCAL_VIEWS
    assert [v.blur_prob for v in views[:2]] == [1.0, 0.1] and [v.solarize_prob for v in views[:2]] == [0.0, 0.2]
    assert cli.main(["run", "dino-digits", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "method.teacher_temp" in out and "method.center_momentum" in out and "model.out_dim" in out
