"""BERT: a bidirectional transformer encoder trained with masked-LM and next-sentence prediction."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.losses.tokens import IGNORE_INDEX, MaskedLMLoss, NSPLoss, token_accuracy
from ssl_models.spec import MethodSpec
from ssl_models.transformer import Transformer, TransformerConfig, init_gpt2_


class MaskedLMHead(nn.Module):
    """BERT's MLM head: Linear, GELU, LayerNorm, then a decoder to the vocabulary.

    The decoder's weight is meant to be tied to the token embedding by its owner (``BERT`` does
    it), so the input and output token spaces are one matrix; its bias stays its own.

    Shape:
        - hidden: (*, dim)
        - output: (*, vocab_size) logits
    """

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))  # (*, V)


class NSPHead(nn.Module):
    """BERT's next-sentence head: a tanh "pooler" on the [CLS] state, then a 2-way Linear.

    Shape:
        - cls: (B, dim), the final hidden state at position 0.
        - output: (B, 2) logits, class 1 = "sentence B follows sentence A".
    """

    def __init__(self, dim: int):
        super().__init__()
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, 2)

    def forward(self, cls: Tensor) -> Tensor:
        return self.classifier(self.pooler(cls).tanh())  # (B, 2)


class BERT(nn.Module):
    """BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
    Language Understanding"): loss = masked-LM + next-sentence prediction.

    A bidirectional pre-LN ``Transformer`` with token, position and segment embeddings, an MLM
    head whose decoder weight is the token embedding, and an NSP head on [CLS] (position 0).
    Masking (15% of tokens; 80% [MASK], 10% random, 10% kept) is done by the data pipeline; this
    module only scores the positions it labelled. The MLM head runs on the masked positions alone,
    which saves the vocabulary projection of the ~85% of positions that carry no label.

    Args:
        vocab_size: tokenizer vocabulary size (ids in [0, vocab_size)).
        max_len: longest sequence, [CLS] and [SEP]s included.
        dim: hidden width, also the ``embed`` feature dimension.
        depth: transformer blocks.
        heads: attention heads (dim must be divisible by heads).
        mlp_ratio: MLP hidden width over dim.
        dropout: dropout in the transformer (0.1 in the paper).
        type_vocab_size: number of segments (2: sentence A and B).
        ignore_index: label of unmasked / padded positions and of unlabelled NSP pairs.

    Shape:
        - batch["input_ids"]: (B, L) long.
        - batch["token_type_ids"]: (B, L) segment ids, optional (zeros).
        - batch["attention_mask"]: (B, L), 1 for real tokens, 0 for padding; optional (all ones).
        - batch["mlm_labels"]: (B, L), the original token where masked, ``ignore_index`` elsewhere.
        - batch["nsp_labels"]: (B,), 1 if sentence B follows A, else 0; optional.
        - ``forward`` output: "loss" (with grad) and detached "mlm_loss", "mlm_acc" and, when
          "nsp_labels" is given, "nsp_loss", "nsp_acc". Accuracies are 0 when nothing is labelled.
        - ``encode_text`` output: (B, L, dim); ``embed`` output: (B, dim), the [CLS] state.
    """

    spec = MethodSpec(
        display_name="BERT", data_kind="text",
        batch_keys=("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels"), embeds=("text",),
        online_metric="val_mlm_accuracy", online_mode="max",
        objective_keys=frozenset({"ignore_index"}), derived=("vocab_size", "max_len"),
        token_batches="masked_pairs", tokenizer="wordpiece", pooling="cls",
        # Not "mean": the masked-LM loss averages over each micro-batch's masked tokens, whose number varies.
        accumulation_note="the masked-LM loss is a mean over each micro-batch's masked tokens, whose number varies")

    def __init__(self, vocab_size: int = 4096, max_len: int = 128, dim: int = 128, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.1, type_vocab_size: int = 2,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.config = TransformerConfig(vocab_size=vocab_size, max_len=max_len, dim=dim, depth=depth, heads=heads,
                                        mlp_ratio=mlp_ratio, dropout=dropout, causal=False,
                                        type_vocab_size=type_vocab_size)
        self.feature_dim = dim
        self.ignore_index = ignore_index
        self.transformer = Transformer(self.config)
        self.mlm_head = MaskedLMHead(dim, vocab_size)
        self.nsp_head = NSPHead(dim)
        init_gpt2_(self.mlm_head, depth)
        init_gpt2_(self.nsp_head, depth)
        self.mlm_head.decoder.weight = self.transformer.tok_emb.weight  # tied: one Parameter, two uses
        self.mlm_loss = MaskedLMLoss(ignore_index)
        self.nsp_loss = NSPLoss(ignore_index)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "mlm_labels" not in batch:
            raise ValueError(f"BERT needs 'mlm_labels' (B, L) in the batch (masked tokens, {self.ignore_index} "
                             f"elsewhere) from the masking transform; got keys {sorted(batch)}")
        hidden = self.encode_text(batch)  # (B, L, D)
        labels = batch["mlm_labels"]
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"mlm_labels must have the shape of input_ids {tuple(hidden.shape[:2])}, "
                             f"got {tuple(labels.shape)}")
        masked = labels != self.ignore_index  # (B, L)
        mlm_logits = self.mlm_head(hidden[masked])  # (M, V), M = number of masked positions
        mlm_labels = labels[masked]  # (M,)
        mlm_loss = self.mlm_loss(mlm_logits, mlm_labels)
        out = {"mlm_loss": mlm_loss.detach(), "mlm_acc": token_accuracy(mlm_logits, mlm_labels, self.ignore_index)}

        nsp_logits = self.nsp_head(hidden[:, 0])  # (B, 2)
        if "nsp_labels" in batch:
            nsp_loss = self.nsp_loss(nsp_logits, batch["nsp_labels"])
            out["nsp_loss"] = nsp_loss.detach()
            out["nsp_acc"] = token_accuracy(nsp_logits, batch["nsp_labels"], self.ignore_index)
        else:
            # No NSP pairs: skip the loss but keep the NSP head in the graph with a zero weight,
            # so DDP (find_unused_parameters=False) still sees a gradient for every parameter.
            nsp_loss = 0.0 * nsp_logits.float().sum()
        return {"loss": mlm_loss + nsp_loss, **out}

    def encode_text(self, batch: dict[str, Tensor]) -> Tensor:
        """Final hidden state of every token. batch["input_ids"] (B, L) -> (B, L, dim)."""
        return self.transformer.forward_batch(batch)

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """The [CLS] (position 0) final hidden state, the sequence feature for a linear probe.

        The encoder's own output rather than the NSP pooler's, which only NSP trains. (B, L) -> (B, dim).
        """
        return self.encode_text(batch)[:, 0]  # (B, D)

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """BERT has no state outside the optimizer."""
