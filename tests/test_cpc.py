"""CPC: CPCLoss vs a naive loop reference, the audio encoder's frames and causality, the CPC
method (gradients, training, autocast, padding) and two gloo processes vs the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
from checks import assert_step_end_changes_nothing
from gloo import run_on_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models.audio import ConvFeatureEncoder, build_context
from ssl_models.losses.cpc import CPCLoss, sample_negatives
from ssl_models.methods.cpc import CPC

# Default wav2vec conv stack (10 ms frames) with tiny widths: 3200 samples (0.2 s) -> 18 frames.
TINY = dict(channels=8, context_dim=8, num_steps=3, num_heads=2)
SAMPLES = 3200


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other test runs
    yield
    torch.set_num_threads(threads)


def sinusoids(batch: int, samples: int = SAMPLES, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """(batch, samples) sums of three sinusoids at 16 kHz, random frequencies and phases per clip."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float64) / 16_000
    freqs = 100 + 1900 * torch.rand(batch, 3, 1, generator=g, dtype=torch.float64)
    phases = 2 * math.pi * torch.rand(batch, 3, 1, generator=g, dtype=torch.float64)
    return torch.sin(2 * math.pi * freqs * t + phases).sum(dim=1).to(dtype)  # (B, T)


# ----------------------------------------------------------------------------- CPCLoss


def naive_cpc(p: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, temperature: float | None):
    """CPC's InfoNCE written out with loops over steps, utterances and times: per step, the mean
    over anchors of -log softmax over all real frames of the batch at the positive z_{t+k}; then
    the mean over steps. Also the per-step top-1 accuracy."""
    b, t, k_max, _ = p.shape

    def score(u: torch.Tensor, v: torch.Tensor) -> float:
        if temperature is None:
            return float(u @ v)
        return float(u @ v / (u.norm() * v.norm())) / temperature

    real = [(j, s) for j in range(b) for s in range(t) if mask[j, s]]
    step_losses, step_accuracies = [], []
    for k in range(1, k_max + 1):
        losses, hits = [], []
        for i in range(b):
            for s in range(t):
                if s + k < t and mask[i, s] and mask[i, s + k]:
                    scores = torch.tensor([score(p[i, s, k - 1], z[j, u]) for j, u in real], dtype=torch.float64)
                    positive = real.index((i, s + k))
                    losses.append(float(torch.logsumexp(scores, 0) - scores[positive]))
                    hits.append(float(scores.argmax() == positive))
        step_losses.append(sum(losses) / len(losses))
        step_accuracies.append(sum(hits) / len(hits))
    return sum(step_losses) / k_max, step_accuracies


@pytest.mark.parametrize("b, t, k, d", [(1, 4, 1, 3), (3, 7, 2, 4), (2, 9, 4, 5)])
@pytest.mark.parametrize("temperature", [None, 0.5])
@pytest.mark.parametrize("padded", [False, True])
def test_cpc_loss_matches_naive_reference(b, t, k, d, temperature, padded):
    g = torch.Generator().manual_seed(100 * b + t)
    p = torch.randn(b, t, k, d, generator=g, dtype=torch.float64)
    z = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    if padded:  # right padding of different lengths; the first clip keeps more than k frames
        mask = torch.arange(t) < torch.tensor([t] + [k + 1 + i for i in range(b - 1)])[:, None]
        z = torch.where(mask[..., None], z, 1e3)  # huge padded frames would dominate if they were candidates
    loss, accuracy = CPCLoss(k, temperature=temperature)(p, z, mask if padded else None)
    want_loss, want_accuracy = naive_cpc(p, z, mask, temperature)
    assert loss.shape == () and accuracy.shape == (k,) and not accuracy.requires_grad
    assert loss.item() == pytest.approx(want_loss, abs=1e-9)
    assert accuracy.tolist() == pytest.approx(want_accuracy, abs=1e-12)


def test_cpc_loss_gather_flag_is_a_no_op_without_process_group():
    p, z = torch.randn(2, 6, 2, 4), torch.randn(2, 6, 4)
    assert torch.equal(CPCLoss(2, gather_distributed=True)(p, z).loss, CPCLoss(2)(p, z).loss)


def test_cpc_loss_sampled_negatives_closed_form():
    """With two real frames, every negative of anchor (0, t=0, k=1) is z_0: a closed form."""
    p, z = torch.randn(2, 4, 1, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    n = 5
    loss, accuracy = CPCLoss(1, num_negatives=n)(p, z, mask)
    pos, neg = float(p[0, 0, 0] @ z[0, 1]), float(p[0, 0, 0] @ z[0, 0])
    assert loss.item() == pytest.approx(-pos + math.log(math.exp(pos) + n * math.exp(neg)), abs=1e-12)
    assert accuracy.item() == float(pos > neg)


def test_sample_negatives_skips_the_positive_and_padding():
    torch.manual_seed(0)
    candidate_mask = torch.tensor([True, False, True, True, False, True])
    positives = torch.tensor([0, 2, 3, 5])
    negatives = sample_negatives(candidate_mask, positives, 3000)  # (4, 3000)
    for positive, row in zip(positives.tolist(), negatives, strict=True):
        others = {0, 2, 3, 5} - {positive}
        counts = torch.bincount(row, minlength=6)
        assert set(row.unique().tolist()) == others  # every other real frame, nothing else
        assert all(abs(counts[i].item() / 3000 - 1 / 3) < 0.05 for i in others)  # uniform


def test_cpc_loss_sampled_negatives_train():
    torch.manual_seed(0)
    p = torch.randn(3, 8, 2, 4, requires_grad=True)
    loss, _ = CPCLoss(2, num_negatives=4, temperature=0.1)(p, torch.randn(3, 8, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_cpc_loss_decreases_under_sgd():
    torch.manual_seed(0)
    b, t, k, f, d = 4, 10, 3, 12, 8
    x = torch.randn(b, t, f)
    # Each prediction sees the input frame it must predict: a solvable task for a linear predictor.
    future = (torch.arange(t)[:, None] + torch.arange(1, k + 1)).clamp(max=t - 1)  # (T, K)
    encoder, predictor = nn.Linear(f, d), nn.Linear(f, d)
    optimizer = torch.optim.SGD([*encoder.parameters(), *predictor.parameters()], lr=0.1)
    loss_fn = CPCLoss(k)
    losses = []
    for _ in range(40):
        loss, accuracy = loss_fn(predictor(x[:, future]), encoder(x))  # (B, T, K, D), (B, T, D)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert accuracy.min() > 0.5


def test_cpc_loss_in_bf16_is_float32_and_close():
    p, z = torch.randn(2, 6, 2, 8), torch.randn(2, 6, 8)
    loss, _ = CPCLoss(2)(p.bfloat16(), z.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(CPCLoss(2)(p, z).loss.item(), rel=2e-2)


@pytest.mark.parametrize("kwargs, says", [(dict(num_steps=0), "num_steps"), (dict(num_negatives=0), "num_negatives"),
                                          (dict(num_negatives="some"), "num_negatives"),
                                          (dict(temperature=0.0), "temperature")])
def test_cpc_loss_rejects_bad_arguments(kwargs, says):
    with pytest.raises(ValueError, match=says):
        CPCLoss(**kwargs)


@pytest.mark.parametrize("p_shape, z_shape, mask, match", [
    ((2, 6, 3, 4), (2, 6, 4), None, "num_steps=2"),
    ((2, 6, 2, 4), (2, 5, 4), None, "targets"),
    ((2, 6, 2, 4), (2, 6, 4), torch.ones(2, 6), "bool"),
    ((2, 2, 2, 4), (2, 2, 4), None, "no utterance has more than 2 real frames"),
])
def test_cpc_loss_rejects_bad_inputs(p_shape, z_shape, mask, match):
    with pytest.raises(ValueError, match=match):
        CPCLoss(2)(torch.randn(p_shape), torch.randn(z_shape), mask)


# ----------------------------------------------------------------------------- audio encoder


def test_feature_encoder_makes_10ms_frames():
    encoder = ConvFeatureEncoder(channels=4)
    assert (encoder.total_stride, encoder.receptive_field, encoder.frame_rate) == (160, 465, 100.0)
    assert encoder.output_length(16_000) == 98  # one second: T / 160 less the 465-sample window
    for samples in (465, 1000, SAMPLES, 16_000):
        frames = encoder(torch.randn(2, 1, samples)).shape  # (B, 1, T) is accepted too
        assert frames == (2, encoder.output_length(samples), 4)
        assert abs(frames[1] - samples / 160) <= 465 / 160
    lengths = torch.tensor([464, 465, 1000])
    assert encoder.output_length(lengths).tolist() == [0, 1, encoder.output_length(1000)]
    with pytest.raises(ValueError, match="receptive field"):
        encoder(torch.randn(2, 400))


def test_feature_encoder_frames_see_only_their_window():
    """Frames inside the first L samples ignore everything after L (per-frame norm, no padding)."""
    encoder = ConvFeatureEncoder(channels=4).double()
    audio = sinusoids(2, dtype=torch.float64)
    length = 2000
    changed = audio.clone()
    changed[:, length:] = torch.randn(2, SAMPLES - length, dtype=torch.float64)
    inside = encoder.output_length(length)
    before, after = encoder(audio), encoder(changed)
    torch.testing.assert_close(before[:, :inside], after[:, :inside], rtol=0, atol=1e-12)
    assert (before[:, inside] - after[:, inside]).abs().max() > 1e-3


def test_build_context_rejects_unknown_kind():
    with pytest.raises(ValueError, match="gru, transformer"):
        build_context("lstm", 4, 8)


@pytest.mark.parametrize("context", ["gru", "transformer"])
def test_context_at_t_ignores_later_audio(context):
    torch.manual_seed(0)
    method = CPC(context=context, **TINY).double()
    encoder = method.encoder
    audio = sinusoids(2, dtype=torch.float64)
    t = 8  # frames 0..t use samples before t * 160 + 465 only
    first_unseen = t * encoder.total_stride + encoder.receptive_field
    later = audio.clone()
    later[:, first_unseen:] = torch.randn(2, SAMPLES - first_unseen, dtype=torch.float64)
    last_seen = audio.clone()
    last_seen[:, first_unseen - 1] += 1.0
    with torch.no_grad():
        c, c_later, c_last_seen = (method.encode_audio({"audio": a}) for a in (audio, later, last_seen))
    torch.testing.assert_close(c[:, :t + 1], c_later[:, :t + 1], rtol=0, atol=1e-12)
    assert (c[:, t + 1:] - c_later[:, t + 1:]).abs().amax(dim=(0, 2)).min() > 1e-6  # every later frame moves
    torch.testing.assert_close(c[:, :t], c_last_seen[:, :t], rtol=0, atol=1e-12)
    assert (c[:, t] - c_last_seen[:, t]).abs().max() > 1e-6


# ----------------------------------------------------------------------------- CPC method


@pytest.mark.parametrize("context", ["gru", "transformer"])
def test_cpc_forward_backward(context):
    torch.manual_seed(0)
    method = CPC(context=context, **TINY)
    out = method({"audio": sinusoids(3)})
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(math.log(3 * 18), rel=0.3)  # ~uniform over 54 frames at init
    assert out["cpc_acc"].shape == () and out["cpc_acc_per_step"].shape == (3,)
    assert not out["cpc_acc"].requires_grad and 0 <= out["cpc_acc"].item() <= 1
    out["loss"].backward()
    for name, param in method.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert_step_end_changes_nothing(method, step=1, max_steps=10)


@pytest.mark.parametrize("context", ["gru", "transformer"])
def test_cpc_loss_decreases_on_a_fixed_batch(context):
    torch.manual_seed(0)
    # 16 channels, not 8: 8 learns too slowly to show in a few dozen steps.
    method = CPC(context=context, **{**TINY, "channels": 16, "context_dim": 16})
    optimizer = torch.optim.Adam(method.parameters(), lr=3e-3)
    batch = {"audio": sinusoids(4, seed=1)}
    losses = []
    for _ in range(40):
        out = method(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_cpc_under_bf16_autocast_has_float32_loss():
    torch.manual_seed(0)
    method = CPC(context="transformer", **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method({"audio": sinusoids(2), "lengths": torch.tensor([SAMPLES, 2500])})
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in method.parameters())


def test_cpc_padding_is_neither_anchor_nor_candidate_nor_pooled():
    torch.manual_seed(0)
    method = CPC(**TINY)
    audio = sinusoids(3)
    lengths = torch.tensor([SAMPLES, 2000, 1200])
    noisy = audio.clone()
    for i, length in enumerate(lengths.tolist()):
        audio[i, length:] = 0.0
        noisy[i, length:] = 10 * torch.randn(SAMPLES - length)
    clean_out, noisy_out = method({"audio": audio, "lengths": lengths}), method({"audio": noisy, "lengths": lengths})
    torch.testing.assert_close(clean_out["loss"], noisy_out["loss"])
    assert method({"audio": noisy})["loss"] != noisy_out["loss"]  # without lengths the padding counts
    with torch.no_grad():
        pooled = method.embed({"audio": noisy, "lengths": lengths})
        frames = method.encode_audio({"audio": noisy})  # (B, T', H)
    assert pooled.shape == (3, method.feature_dim)
    real = method.encoder.output_length(1200)
    torch.testing.assert_close(pooled[2], frames[2, :real].mean(dim=0))
    torch.testing.assert_close(method.embed({"audio": noisy}), frames.mean(dim=1))


@pytest.mark.parametrize("batch, match", [
    ({"waveform": torch.randn(2, SAMPLES)}, "batch\\['audio'\\]"),
    ({"audio": torch.randn(2, 2, SAMPLES)}, "mono"),
    ({"audio": torch.ones(2, SAMPLES, dtype=torch.int16)}, "float"),
    ({"audio": torch.randn(2, SAMPLES), "lengths": torch.tensor([SAMPLES, 0])}, "lie in"),
    ({"audio": torch.randn(2, SAMPLES), "lengths": torch.tensor([1.0, 2.0])}, "integer"),
    ({"audio": torch.randn(2, 900)}, "crop clips to at least 945 samples"),
])
def test_cpc_rejects_bad_batches(batch, match):
    with pytest.raises(ValueError, match=match):
        CPC(**TINY)(batch)


# ----------------------------------------------------------------------------- two gloo processes

WORLD = 2
CLIPS = 4  # global batch; each rank takes CLIPS // WORLD
LENGTHS = torch.tensor([SAMPLES, 2400, SAMPLES, 1600])  # ranks get different numbers of anchors
CASES = {"gru": (dict(context="gru"), None), "transformer_padded": (dict(context="transformer"), LENGTHS)}


def _method(gather: bool, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    # float64, and no BatchNorm anywhere: per-frame LayerNorm is the same on a half batch.
    return CPC(**TINY, **kwargs, gather_distributed=gather).double()


def _loss_and_grads(model: nn.Module, audio: torch.Tensor, lengths: torch.Tensor | None) -> dict:
    batch = {"audio": audio} if lengths is None else {"audio": audio, "lengths": lengths}
    loss = model(batch)["loss"]
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()]}


def _worker(rank: int) -> dict:
    rows = slice(rank * CLIPS // WORLD, (rank + 1) * CLIPS // WORLD)
    audio = sinusoids(CLIPS, seed=2, dtype=torch.float64)[rows]
    results = {}
    for name, (kwargs, lengths) in CASES.items():
        model = DistributedDataParallel(_method(gather=True, **kwargs))
        results[name] = _loss_and_grads(model, audio, None if lengths is None else lengths[rows])
    results["local_only"] = _loss_and_grads(DistributedDataParallel(_method(gather=False)), audio, None)
    return results


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("gloo_cpc"), world=WORLD)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_single_process_loss_and_gradients(two_rank_results, case):
    kwargs, lengths = CASES[case]
    whole = _loss_and_grads(_method(gather=False, **kwargs), sinusoids(CLIPS, seed=2, dtype=torch.float64), lengths)
    ranks = [res[case] for res in two_rank_results]
    torch.testing.assert_close(torch.stack([res["loss"] for res in ranks]).mean(), whole["loss"], rtol=0, atol=1e-10)
    for res in ranks:  # DDP leaves the same averaged gradient on every rank
        for got, want in zip(res["grads"], whole["grads"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_two_ranks_without_gather_see_fewer_negatives(two_rank_results):
    """Negative control: candidates from the local half only give a lower loss than the whole batch."""
    whole = _loss_and_grads(_method(gather=False), sinusoids(CLIPS, seed=2, dtype=torch.float64), None)
    mean_loss = torch.stack([res["local_only"]["loss"] for res in two_rank_results]).mean()
    assert mean_loss < whole["loss"] - 0.1
