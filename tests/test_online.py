"""Online evaluation during training: the held-out splits, every method's numbers, FSDP ranks
agreeing with one process. A real two-worker fit whose metrics and reports carry val_* is in
test_prometheus.py (the run its Prometheus scrapes)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gloo import run_on_ranks

import ssl_models
from ssl_platform import methods
from ssl_platform.config import load_config
from ssl_platform.data.online import balanced_subset, online_split
from ssl_platform.data.python_docs import load_python_docs
from ssl_platform.data.tokenizer import TokenizerConfig, load_or_train_tokenizer
from ssl_platform.methods import method_spec, method_specs
from ssl_platform.train.metrics import MetricsLogger, read_metrics
from ssl_platform.train.online import online_metrics

# Tiny architectures, so that every evaluation here takes a fraction of a second.
TINY = {
    "simclr": ("simclr-digits", ["model.encoder_widths=[4,8]", "model.projector_width=16", "model.projector_dim=8"]),
    # the digits-m presets on the plain digits: grayscale, small
    "byol": ("byol-digits-m", ["data.corpus=digits", "model.encoder_widths=[4,8]", "model.projector_width=16",
                               "model.projector_dim=8", "model.predictor_width=16"]),
    "barlow_twins": ("barlow-digits-m", ["data.corpus=digits", "model.encoder_widths=[4,8]",
                                         "model.projector_width=16", "model.projector_dim=16"]),
    "vicreg": ("vicreg-digits-m", ["data.corpus=digits", "model.encoder_widths=[4,8]", "model.expander_width=16",
                                   "model.expander_dim=16"]),
    "clip": ("clip-digit-captions", ["model.vision_width=16", "model.vision_layers=1", "model.vision_heads=2",
                                     "model.text_width=16", "model.text_layers=1", "model.text_heads=2",
                                     "model.embed_dim=16"]),
    "cpc": ("cpc-spoken-digits", ["model.channels=16", "model.context_dim=16", "data.crop_seconds=0.25",
                                  "method.num_steps=4"]),
    "bert": ("bert-python-docs", ["model.dim=32", "model.depth=1", "data.vocab_size=512", "data.max_len=32"]),
    "gpt": ("gpt-python-docs", ["model.dim=32", "model.depth=1", "data.vocab_size=512", "data.max_len=32"]),
}


def tiny_config(method: str, *extra: str):
    preset, overrides = TINY[method]
    return load_config(preset, [*overrides, "eval.online_examples=64", "eval.online_every=5", *extra])


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """The run tokenizers of BERT and GPT, trained on the python-docs training documents."""
    root = tmp_path_factory.mktemp("tokenizers")
    texts = [d.text for d in load_python_docs(0.1, 0)["train"]]
    out = {}
    for name, kind in (("bert", "wordpiece"), ("gpt", "bpe")):
        load_or_train_tokenizer(root / name, texts, TokenizerConfig(kind=kind, vocab_size=512))
        out[name] = root / name
    return out


def build(cfg, tokenizers: dict[str, Path]):
    """The split and a random-init method of ``cfg``, as the driver and a worker would make them."""
    from ssl_platform.data.tokenizer import TextTokenizer

    artifacts = {"tokenizer": tokenizers[cfg.method.name]} if cfg.method.name in tokenizers else {}
    derived = methods.expected_derived(cfg)
    if artifacts:
        derived["vocab_size"] = TextTokenizer.load(artifacts["tokenizer"]).vocab_size
    split = online_split(cfg, methods.architecture(cfg), artifacts)
    torch.manual_seed(0)
    return split, methods.build(cfg, **derived), derived


def test_every_method_has_a_primary_metric_with_a_direction():
    specs = method_specs()
    assert set(specs) == set(ssl_models.METHODS)
    assert all(s.online_metric.startswith("val_") and s.online_mode in ("max", "min") for s in specs.values())


@pytest.mark.parametrize("method", sorted(TINY))
def test_numbers_in_range_for_every_method(method, tokenizers):
    cfg = tiny_config(method)
    split, model, derived = build(cfg, tokenizers)
    rows = {k: len(v) for k, v in split.items()}
    assert max(rows.values()) <= 64 and min(rows.values()) >= 8  # eval.online_examples bounds the split
    model.train()
    out = online_metrics(model, split, cfg)

    key = method_spec(method).online_metric
    assert key in out and all(np.isfinite(v) for v in out.values())
    for name, value in out.items():
        if name.endswith(("top1", "accuracy")):
            assert 0.0 <= value <= 1.0, (name, value)
    if "val_loss" in out:
        assert out["val_loss"] > 0
    if method == "gpt":  # a random-init LM is about as unsure as a uniform guess over the vocabulary
        assert derived["vocab_size"] / 3 < out["val_perplexity"] < derived["vocab_size"] * 3
        assert out["val_perplexity"] == pytest.approx(np.exp(out["val_loss"]))
    if method == "bert":  # and so rarely right about a masked token
        assert out["val_mlm_accuracy"] < 0.1 and 0 <= out["val_nsp_accuracy"] <= 1
    # Training mode comes back (the loop goes on training), and the split is fixed: same numbers again.
    assert all(m.training for m in model.modules())
    assert online_metrics(model, split, cfg) == pytest.approx(out)


def test_gathering_stays_switched_on_after_the_evaluation(tokenizers):
    cfg = tiny_config("simclr", "method.gather_distributed=true")
    split, model, _ = build(cfg, tokenizers)
    online_metrics(model, split, cfg)
    assert model.criterion.gather_distributed is True


def test_held_out_split_is_fixed_balanced_and_apart_from_the_bank():
    cfg = tiny_config("simclr", "eval.online_examples=100")
    a, b = online_split(cfg, {}, {}), online_split(cfg, {}, {})
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len(a["image"]) == 50 and len(a["bank_image"]) == 50 and a["image"].dtype == np.uint8
    assert np.bincount(a["label"], minlength=10).min() == 5  # 50 queries over 10 digits: 5 each
    # Queries are held-out images, the bank training images: no image is in both.
    queries = {img.tobytes() for img in a["image"]}
    assert not queries & {img.tobytes() for img in a["bank_image"]}
    labels = np.array([0] * 90 + [1] * 10)
    assert np.bincount(labels[balanced_subset(labels, 20, seed=0)]).tolist() == [10, 10]


def test_clip_split_holds_every_class_prompt_ensemble():
    cfg = tiny_config("clip")
    split = online_split(cfg, methods.architecture(cfg), {})
    assert split["prompts"].shape == (10, 5, 16) and split["text"].shape == (64, 16)


def _train(model, batches, steps: int, lr: float, loss_fn) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        loss = loss_fn(batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_trained_encoder_beats_random_init_on_knn():
    """The metric follows what the encoder knows: a few epochs with labels lift the kNN accuracy."""
    from ssl_platform.data.builtin import load_digits_splits
    from ssl_platform.data.transforms import to_float

    cfg = tiny_config("simclr", "eval.online_examples=256", "data.image_size=16")
    split = online_split(cfg, {}, {})
    torch.manual_seed(0)
    model = methods.build(cfg, in_channels=1)
    before = online_metrics(model, split, cfg)["val_knn_top1"]
    train = load_digits_splits(cfg.data.image_size, cfg.data.val_fraction, cfg.train.seed)["train"]
    x, y = to_float(train.images[:512]), torch.from_numpy(train.labels[:512])
    head = torch.nn.Linear(model.feature_dim, 10)
    model.add_module("probe_head", head)  # trained along, then ignored by embed
    batches = list(zip(x.split(64), y.split(64), strict=True))
    _train(model, batches, 2 * len(batches), 3e-3,
           lambda b: F.cross_entropy(head(model.embed({"image": b[0]})), b[1]))
    after = online_metrics(model, split, cfg)["val_knn_top1"]
    assert after > before + 0.05, (before, after)


def test_trained_gpt_has_lower_held_out_perplexity(tokenizers):
    from ssl_platform.data.masking import GptBlocks

    cfg = tiny_config("gpt")
    split, model, _ = build(cfg, tokenizers)
    before = online_metrics(model, split, cfg)["val_perplexity"]
    docs = [d.text for d in load_python_docs(cfg.data.val_fraction, cfg.train.seed)["train"]]
    blocks = GptBlocks(str(tokenizers["gpt"]), cfg.data.max_len, tail="drop")({"text": np.array(docs[:200])})
    ids = torch.from_numpy(blocks["input_ids"])
    _train(model, [{"input_ids": b} for b in ids.split(16)], 30, 3e-3, lambda b: model(b)["loss"])
    after = online_metrics(model, split, cfg)["val_perplexity"]
    assert after < 0.5 * before, (before, after)


def test_logger_rows_and_progress_line_carry_the_online_metrics(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, "run", max_steps=10, start_step=0, enabled=True)
    interval = {"loss": 1.0, "samples": 8.0, "tokens": 0.0, "steps": 1, "data_wait_s": 0.0}
    assert logger.untimed(lambda a: a + 1, 1) == 2
    logger.log(5, interval, lr=0.1, epoch=0, val_knn_top1=0.75, online_eval_s=0.2)
    logger.log(6, dict(interval), lr=0.1, epoch=0)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["val_knn_top1"] == 0.75 and "val_knn_top1" not in rows[1]
    lines = capsys.readouterr().out.splitlines()
    assert "val_knn_top1 0.75" in lines[0] and "val_" not in lines[1]


# ----------------------------------------------------------------------------- FSDP: every rank evaluates

def _tiny_gpt_and_split():
    torch.manual_seed(0)
    model = ssl_models.build_method("gpt", vocab_size=64, max_len=16, dim=16, depth=2, heads=2)
    g = np.random.default_rng(0)
    split = {"input_ids": g.integers(0, 64, (20, 16)), "attention_mask": np.ones((20, 16), np.int64)}
    split["attention_mask"][-1, 10:] = 0
    return model, split


def _tiny_simclr_and_split():
    """BatchNorm in a ResNet: the root FSDP unit holds the whole encoder."""
    torch.manual_seed(0)
    model = ssl_models.build_method("simclr", in_channels=1, encoder_widths=[4, 8], projector_width=16,
                                    projector_dim=8)
    g = np.random.default_rng(0)
    split = {"image": g.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8), "label": g.integers(0, 3, 12),
             "bank_image": g.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8), "bank_label": g.integers(0, 3, 20)}
    return model, split


def _fsdp_worker(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from ssl_platform.train.loop import shard_model

    out = {}
    for name, make in (("gpt", _tiny_gpt_and_split), ("simclr", _tiny_simclr_and_split)):
        model, split = make()
        shard_model(model, init_device_mesh("cpu", (2,)))
        cfg = load_config(TINY[name][0], ["eval.batch_size=8", "train.batch_size=8"])
        out[name] = online_metrics(model, split, cfg)
        # Training goes on afterwards: parameters sharded again, training mode back.
        out[name + "_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
        out[name + "_training"] = all(m.training for m in model.modules())
    return out


@pytest.mark.ray  # two processes, like the other distributed tests
def test_fsdp_ranks_each_get_the_single_process_numbers(tmp_path):
    ranks = run_on_ranks(_fsdp_worker, tmp_path)
    for name, make in (("gpt", _tiny_gpt_and_split), ("simclr", _tiny_simclr_and_split)):
        model, split = make()
        cfg = load_config(TINY[name][0], ["eval.batch_size=8", "train.batch_size=8"])
        single = online_metrics(model, split, cfg)
        for r in ranks:
            assert r[name] == pytest.approx(single, rel=1e-4), name
            assert r[name + "_sharded"] and r[name + "_training"]


@pytest.mark.ray
def test_text_split_of_a_corpus_path_is_its_held_out_documents(ray_session, tmp_path):
    """data.path text: the documents its hash holds out, read with Ray Data, the same ones every time."""
    from ssl_platform.data.text import in_split

    docs = load_python_docs(0.1, 0)["train"][:80]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    tokenizer = tmp_path / "tokenizer"
    load_or_train_tokenizer(tokenizer, [d.text for d in docs], TokenizerConfig(kind="wordpiece", vocab_size=512))
    cfg = tiny_config("bert", f"data.path={corpus}", "data.kind=text", "data.val_fraction=0.25")
    first = online_split(cfg, {}, {"tokenizer": tokenizer})
    second = online_split(cfg, {}, {"tokenizer": tokenizer})
    assert 8 <= len(first["input_ids"]) <= 64 and all(np.array_equal(first[k], second[k]) for k in first)
    assert (first["mlm_labels"] != -100).any() and set(np.unique(first["nsp_labels"])) <= {-100, 0, 1}
    # A corpus whose hash holds out no document is refused with what to change. A .txt
    # document's key is "FILE:FIRST_LINE": name the file so that its one document trains.
    lone = next(p for p in (tmp_path / f"lone{i}.txt" for i in range(100))
                if not in_split(f"{p}:1", "val", val_fraction=0.05, seed=0))
    lone.write_text("A single document. It stays in the training split.\n")
    with pytest.raises(ValueError, match=r"raise data.val_fraction or set eval.online_every=0"):
        online_split(tiny_config("bert", f"data.path={lone}", "data.kind=text", "data.val_fraction=0.05"), {},
                     {"tokenizer": tokenizer})
