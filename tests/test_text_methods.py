"""BERT, GPT, their shared transformer stack and the token losses (CPU, no Ray)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from checks import assert_step_end_changes_nothing
from torch import nn

from ssl_models.losses.tokens import CausalLMLoss, MaskedLMLoss, NSPLoss
from ssl_models.methods.bert import BERT
from ssl_models.methods.gpt import GPT
from ssl_models.transformer import TransformerConfig

VOCAB, MAX_LEN, DIM, DEPTH = 100, 16, 32, 2
SMALL = dict(vocab_size=VOCAB, max_len=MAX_LEN, dim=DIM, depth=DEPTH, heads=4, dropout=0.0)
METHODS = [BERT, GPT]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def make(cls, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**{**SMALL, **overrides})


def ids(batch: int = 3, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def bert_batch(batch: int = 4, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed masked batch: every third position masked (label = original id), two segments."""
    input_ids = ids(batch, length, seed)
    labels = torch.full_like(input_ids, -100)
    labels[:, 1::3] = input_ids[:, 1::3]
    masked_input = input_ids.clone()
    masked_input[:, 1::3] = 0  # id 0 plays [MASK]
    segments = (torch.arange(length) >= length // 2).long().expand(batch, length)
    return {"input_ids": masked_input, "token_type_ids": segments, "attention_mask": torch.ones_like(input_ids),
            "mlm_labels": labels, "nsp_labels": torch.arange(batch) % 2}


def batch_for(cls) -> dict[str, torch.Tensor]:
    return bert_batch() if cls is BERT else {"input_ids": ids(), "attention_mask": torch.ones(3, 10, dtype=torch.long)}


def train(compute_loss, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """``steps`` optimizer steps on ``compute_loss()``; the loss before each step."""
    losses = []
    for _ in range(steps):
        loss = compute_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def tied_pair(model: nn.Module) -> tuple[nn.Parameter, nn.Linear]:
    """(token embedding weight, the output layer that should share it)."""
    out = model.mlm_head.decoder if isinstance(model, BERT) else model.lm_head
    return model.transformer.tok_emb.weight, out


# ------------------------------------------------------------------------------------ token losses

def naive_cross_entropy(rows: list[tuple[list[float], int]]) -> float:
    """Mean over (logits, label) pairs of log-sum-exp(logits) - logits[label]; 0 for no pairs."""
    total = 0.0
    for logits, label in rows:
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[label]
    return total / len(rows) if rows else 0.0


def labels_with_ignored(shape, classes: int, ignored: float, ignore_index: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, shape, generator=g)
    return labels.masked_fill(torch.rand(shape, generator=g) < ignored, ignore_index)


LOSS_CASES = pytest.mark.parametrize("ignored", [0.0, 0.5, 1.0])
SHAPES = pytest.mark.parametrize("shape", [(1, 3, 5), (3, 7, 11)])


@LOSS_CASES
@SHAPES
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_masked_lm_loss_matches_naive_reference(shape, ignored, ignore_index):
    b, length, v = shape
    logits = torch.randn(b, length, v, generator=torch.Generator().manual_seed(v), dtype=torch.float64) * 2
    labels = labels_with_ignored((b, length), v, ignored, ignore_index, seed=b + length)
    rows = [(logits[i, t].tolist(), int(labels[i, t])) for i in range(b) for t in range(length)
            if labels[i, t] != ignore_index]
    loss = MaskedLMLoss(ignore_index)(logits, labels)
    assert loss.shape == () and loss.item() == pytest.approx(naive_cross_entropy(rows), abs=1e-10)
    assert MaskedLMLoss(ignore_index)(logits[labels != ignore_index], labels[labels != ignore_index]) == loss


@LOSS_CASES
@pytest.mark.parametrize("batch", [1, 6])
def test_nsp_loss_matches_naive_reference(batch, ignored):
    logits = torch.randn(batch, 2, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
    labels = labels_with_ignored((batch,), 2, ignored, -100, seed=batch)
    rows = [(logits[i].tolist(), int(labels[i])) for i in range(batch) if labels[i] != -100]
    assert NSPLoss()(logits, labels).item() == pytest.approx(naive_cross_entropy(rows), abs=1e-10)


@LOSS_CASES
@SHAPES
def test_causal_lm_loss_matches_naive_reference(shape, ignored):
    b, length, v = shape
    logits = torch.randn(b, length, v, generator=torch.Generator().manual_seed(v), dtype=torch.float64) * 2
    labels = labels_with_ignored((b, length), v, ignored, -100, seed=b * length)
    # Position t predicts the label at t + 1; the label at position 0 is never a target.
    rows = [(logits[i, t].tolist(), int(labels[i, t + 1])) for i in range(b) for t in range(length - 1)
            if labels[i, t + 1] != -100]
    assert CausalLMLoss()(logits, labels).item() == pytest.approx(naive_cross_entropy(rows), abs=1e-10)


@pytest.mark.parametrize("loss_fn, shape", [(MaskedLMLoss(), (2, 5, 7)), (NSPLoss(), (4, 2)),
                                             (CausalLMLoss(), (2, 5, 7)), (CausalLMLoss(), (2, 1, 7))])
def test_fully_ignored_batch_gives_zero_with_finite_gradient(loss_fn, shape):
    logits = torch.randn(shape, requires_grad=True)
    loss = loss_fn(logits, torch.full(shape[:-1], -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(shape))


@pytest.mark.parametrize("loss_fn, shape", [(MaskedLMLoss(), (2, 5, 7)), (NSPLoss(), (4, 2)),
                                             (CausalLMLoss(), (2, 5, 7))])
def test_token_losses_in_float32_from_bf16_and_decrease_under_sgd(loss_fn, shape):
    g = torch.Generator().manual_seed(0)
    labels = labels_with_ignored(shape[:-1], shape[-1], 0.3, -100, seed=0)
    logits = torch.randn(shape, generator=g)
    low = loss_fn(logits.bfloat16(), labels)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(loss_fn(logits, labels).item(), rel=2e-2)

    param = nn.Parameter(logits)
    losses = train(lambda: loss_fn(param, labels), torch.optim.SGD([param], lr=1.0), steps=30)
    assert losses[-1] < 0.5 * losses[0], losses


def test_token_loss_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels must lie in"):
        MaskedLMLoss()(torch.randn(2, 3, 5), torch.tensor([[0, 1, 5], [-100, 2, 3]]))
    with pytest.raises(ValueError, match=r"NSP needs logits \(B, 2\)"):
        NSPLoss()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------- input validation

@pytest.mark.parametrize("kwargs, match", [(dict(dim=30, heads=4), "divisible"), (dict(depth=0), "depth"),
                                           (dict(dropout=1.0), "dropout")])
def test_config_rejects_bad_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kwargs)


@pytest.mark.parametrize("cls", METHODS)
@pytest.mark.parametrize("change, match", [
    (lambda b: {**b, "input_ids": b["input_ids"] + VOCAB}, "vocab_size"),
    (lambda b: {**b, "input_ids": b["input_ids"] - VOCAB}, "vocab_size"),
    (lambda b: {**b, "input_ids": b["input_ids"].float()}, "torch.long"),
    (lambda b: {**b, "input_ids": ids(3, MAX_LEN + 1)}, "max_len"),
    (lambda b: {**b, "attention_mask": b["attention_mask"][:, :-1]}, "attention_mask"),
    (lambda b: {k: v for k, v in b.items() if k != "input_ids"}, "input_ids"),
])
def test_bad_input_raises_value_error_saying_what_to_change(cls, change, match):
    model = make(cls)
    with pytest.raises(ValueError, match=match):
        model(change(batch_for(cls)))


def test_bert_rejects_bad_labels_and_segments():
    model, batch = make(BERT), bert_batch()
    for bad, match in [({"mlm_labels": None}, "mlm_labels"),
                       ({"mlm_labels": batch["mlm_labels"][:, :-1]}, "mlm_labels"),
                       ({"token_type_ids": batch["token_type_ids"] + 2}, "type_vocab_size"),
                       ({"nsp_labels": batch["nsp_labels"][:, None]}, "NSP")]:
        broken = {k: v for k, v in {**batch, **bad}.items() if v is not None}
        with pytest.raises(ValueError, match=match):
            model(broken)


# ------------------------------------------------------------------------------ attention masking

@pytest.mark.parametrize("with_mask", [False, True])  # SDPA's is_causal path and the explicit-mask path
def test_gpt_is_causal_and_bert_is_not(with_mask):
    t = 4
    before = ids(2, 10)
    after = before.clone()
    after[:, t + 1:] = (after[:, t + 1:] + 1 + torch.arange(5)) % VOCAB  # every token after t changes
    mask = torch.ones_like(before) if with_mask else None
    gpt, bert = make(GPT).eval(), make(BERT).eval()
    with torch.no_grad():
        g0, g1 = gpt.logits(before, mask), gpt.logits(after, mask)  # (B, L, V)
        b0, b1 = (bert.mlm_head(bert.transformer(x, mask)) for x in (before, after))
    torch.testing.assert_close(g0[:, :t + 1], g1[:, :t + 1], rtol=0, atol=1e-6)
    assert (g0[:, t + 1:] - g1[:, t + 1:]).abs().amax(-1).min() > 1e-4  # later positions do see the change
    assert (b0[:, :t + 1] - b1[:, :t + 1]).abs().amax(-1).min() > 1e-4  # BERT sees the future


@pytest.mark.parametrize("cls, padded", [(BERT, slice(7, None)), (GPT, slice(7, None)), (BERT, slice(0, 3)),
                                         (GPT, slice(0, 3))])  # right and left padding
def test_outputs_at_real_tokens_ignore_padded_ids(cls, padded):
    model = make(cls).eval()
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[:, padded] = 0
    real = mask.bool()
    a = ids(3, 10)
    b = a.clone()
    b[:, padded] = (b[:, padded] + 17) % VOCAB
    with torch.no_grad():
        ha, hb = (model.encode_text({"input_ids": x, "attention_mask": mask}) for x in (a, b))
        unmasked = model.encode_text({"input_ids": b})
    torch.testing.assert_close(ha[real], hb[real], rtol=0, atol=1e-6)
    if cls is GPT or padded.start != 0:  # BERT's [CLS] feature is position 0, so BERT pads on the right
        torch.testing.assert_close(model.embed({"input_ids": a, "attention_mask": mask}),
                                   model.embed({"input_ids": b, "attention_mask": mask}), rtol=0, atol=1e-6)
    if cls is BERT or padded.start == 0:  # negative control: without the mask the pads leak in
        assert (unmasked[real] - ha[real]).abs().max() > 1e-4


@pytest.mark.parametrize("cls", METHODS)
def test_all_padding_row_stays_finite(cls):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1] = 0
    hidden = make(cls).encode_text({"input_ids": ids(2, 6), "attention_mask": mask})
    assert torch.isfinite(hidden).all()


def test_gpt_loss_ignores_padding_and_honours_labels_override():
    model = make(GPT)
    x, mask = ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    changed = x.clone()
    changed[0, 5:] = (changed[0, 5:] + 3) % VOCAB
    loss = model({"input_ids": x, "attention_mask": mask})["loss"]
    assert loss.item() == pytest.approx(model({"input_ids": changed, "attention_mask": mask})["loss"].item(), abs=1e-6)

    labels = torch.full_like(x, -100)
    labels[:, -1] = x[:, -1]  # only the last token is a target: scored from position -2
    logits = model.logits(x).detach().double()
    want = naive_cross_entropy([(logits[i, -2].tolist(), int(x[i, -1])) for i in range(2)])
    assert model({"input_ids": x, "labels": labels})["loss"].item() == pytest.approx(want, abs=1e-5)


# ------------------------------------------------------------------------------------ tied weights

@pytest.mark.parametrize("cls", METHODS)
def test_output_layer_is_tied_to_token_embedding_and_gets_both_gradients(cls):
    tied = make(cls)
    embedding, output = tied_pair(tied)
    assert output.weight is embedding
    if cls is BERT:
        assert output.bias is not None and output.bias is not embedding  # the decoder keeps its own bias

    untied = copy.deepcopy(tied)  # same values; then give the output layer a separate copy
    untied_embedding, untied_output = tied_pair(untied)
    untied_output.weight = nn.Parameter(untied_output.weight.detach().clone())
    batch = batch_for(cls)
    tied(batch)["loss"].backward()
    untied(batch)["loss"].backward()
    from_input, from_output = untied_embedding.grad, untied_output.weight.grad
    assert from_input.abs().sum() > 0 and from_output.abs().sum() > 0
    torch.testing.assert_close(embedding.grad, from_input + from_output, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------- generate

def test_generate_length_prefix_and_training_flag():
    model = make(GPT).train()
    prompt = ids(2, 5)
    out = model.generate(prompt, max_new_tokens=7, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt)
    assert ((out >= 0) & (out < VOCAB)).all() and model.training
    assert torch.equal(model.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 3, top_k=0)


def test_greedy_generation_is_deterministic_argmax():
    model, prompt = make(GPT), ids(2, 4)
    greedy = model.generate(prompt, 6, temperature=0.0)
    assert torch.equal(greedy, model.generate(prompt, 6, temperature=0.0))
    assert torch.equal(greedy, model.generate(prompt, 6, temperature=0.7, top_k=1))
    with torch.no_grad():
        for t in range(4, 10):  # each new token is the argmax after its prefix
            assert torch.equal(greedy[:, t], model.logits(greedy[:, :t])[:, -1].argmax(-1))


def test_top_k_restricts_the_support():
    model = make(GPT)
    prompt = ids(1, 4).expand(400, 4)  # one prompt, 400 independent samples of the next token
    with torch.no_grad():
        allowed = set(model.logits(prompt[:1])[0, -1].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    top3 = set(model.generate(prompt, 1, temperature=2.0, top_k=3, generator=g)[:, -1].tolist())
    free = set(model.generate(prompt, 1, temperature=2.0, generator=g)[:, -1].tolist())
    assert top3 <= allowed and len(top3) > 1
    assert len(free) > 10  # negative control: without top_k the support is much wider


def test_generate_crops_context_to_max_len():
    model = make(GPT)
    prompt = ids(2, MAX_LEN + 4)
    out = model.generate(prompt, 5, temperature=0.0)
    assert out.shape == (2, MAX_LEN + 9) and torch.equal(out[:, :MAX_LEN + 4], prompt)
    # The first 4 tokens are beyond the window: generating from the cropped prompt is the same.
    assert torch.equal(out[:, 4:], model.generate(prompt[:, 4:], 5, temperature=0.0))


def test_generate_stops_at_eos():
    model, prompt = make(GPT), ids(2, 4)
    sample = dict(temperature=2.0, top_k=None)  # hot sampling: a row rarely repeats a token by itself
    free = model.generate(prompt, 8, generator=torch.Generator().manual_seed(0), **sample)
    eos = int(free[0, 5])  # row 0's second new token
    out = model.generate(prompt, 8, eos_id=eos, generator=torch.Generator().manual_seed(0), **sample)
    first = int((free[0, 4:] == eos).nonzero()[0])
    assert not (free[0, 4 + first:] == eos).all()  # unconstrained, row 0 goes on after eos ...
    assert (out[0, 4 + first:] == eos).all()  # ... with eos_id it keeps emitting eos
    assert torch.equal(out[0, :4 + first + 1], free[0, :4 + first + 1])  # same draws up to there
    alone = model.generate(prompt[:1], 8, generator=torch.Generator().manual_seed(1), **sample)
    eos = int(alone[0, 5])
    first = int((alone[0, 4:] == eos).nonzero()[0])
    stopped = model.generate(prompt[:1], 8, eos_id=eos, generator=torch.Generator().manual_seed(1), **sample)
    assert torch.equal(stopped, alone[:, :4 + first + 1])  # every row finished: stop early


# --------------------------------------------------------------------------- methods end to end

@pytest.mark.parametrize("cls", METHODS)
def test_forward_backward_reaches_every_parameter(cls):
    model = make(cls)
    out = model(batch_for(cls))
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert_step_end_changes_nothing(model, step=1, max_steps=10)


def test_bert_metrics_and_nsp_skipped_without_labels():
    model, batch = make(BERT), bert_batch()
    out = model(batch)
    assert out["loss"].item() == pytest.approx(out["mlm_loss"].item() + out["nsp_loss"].item(), rel=1e-6)
    assert 0 <= out["mlm_acc"].item() <= 1 and 0 <= out["nsp_acc"].item() <= 1
    batch.pop("nsp_labels")
    batch.pop("token_type_ids")  # optional: zeros
    no_nsp = model(batch)
    assert "nsp_loss" not in no_nsp and no_nsp["loss"].item() == pytest.approx(no_nsp["mlm_loss"].item())
    no_nsp["loss"].backward()  # the NSP head stays in the graph (zero gradient) so DDP sees every parameter
    assert all(p.grad is not None for p in model.nsp_head.parameters())


def test_embed_shapes():
    bert, gpt, batch = make(BERT), make(GPT), bert_batch()
    torch.testing.assert_close(bert.embed(batch), bert.encode_text(batch)[:, 0])
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6, [1] * 10, [1] * 10])
    hidden = gpt.encode_text({"input_ids": batch["input_ids"], "attention_mask": mask})
    features = gpt.embed({"input_ids": batch["input_ids"], "attention_mask": mask})
    assert features.shape == (4, DIM) == bert.embed(batch).shape
    torch.testing.assert_close(features[1], hidden[1, :4].mean(0))


@pytest.mark.parametrize("cls, ratio", [(BERT, 0.5), (GPT, 0.05)])
def test_loss_decreases_on_a_fixed_batch(cls, ratio):
    model = make(cls)
    batch = bert_batch(4, 12) if cls is BERT else {"input_ids": ids(2, 12)}  # GPT memorises 2 sequences
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = train(lambda: model(batch)["loss"], optimizer, steps=40)
    assert losses[-1] < ratio * losses[0], losses


@pytest.mark.parametrize("cls", METHODS)
def test_bf16_autocast_gives_float32_loss(cls):
    model, batch = make(cls), batch_for(cls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(model(batch)["loss"].item(), rel=5e-2)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gpt2_init_scales_residual_projections():
    model = GPT(vocab_size=VOCAB, max_len=MAX_LEN, dim=64, depth=4, heads=4)
    block = model.transformer.blocks[0]
    want = 0.02 / math.sqrt(2 * 4)
    for layer in (block.attn.proj, block.mlp.proj):
        assert layer.weight.std().item() == pytest.approx(want, rel=0.1) and not layer.bias.any()
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.transformer.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_dropout_only_in_training_mode():
    model, batch = make(GPT, dropout=0.5), {"input_ids": ids()}
    assert not torch.equal(model.encode_text(batch), model.encode_text(batch))
    model.eval()
    assert torch.equal(model.encode_text(batch), model.encode_text(batch))

