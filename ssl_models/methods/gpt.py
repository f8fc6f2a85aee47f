"""GPT: a causal transformer decoder trained on next-token prediction, with sampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_models.losses.tokens import IGNORE_INDEX, CausalLMLoss
from ssl_models.spec import MethodSpec
from ssl_models.transformer import Transformer, TransformerConfig, masked_mean


class GPT(nn.Module):
    """GPT (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training";
    2019, "Language Models are Unsupervised Multitask Learners").

    A causal pre-LN ``Transformer`` and a bias-free LM head whose weight is the token embedding
    (tied). Trained with teacher forcing: the logits at positions ``[:, :-1]`` predict
    ``input_ids[:, 1:]``, padding (attention_mask == 0) excluded. ``generate`` samples
    continuations of a prompt, which is also how in-context prompts are evaluated.

    Args:
        vocab_size: tokenizer vocabulary size (ids in [0, vocab_size)).
        max_len: context length; longer prompts are cropped to their last max_len tokens in ``generate``.
        dim: hidden width, also the ``embed`` feature dimension.
        depth: transformer blocks.
        heads: attention heads (dim must be divisible by heads).
        mlp_ratio: MLP hidden width over dim.
        dropout: dropout in the transformer (0 suits small data; 0.1 in the papers).
        ignore_index: label of positions that do not count.

    Shape:
        - batch["input_ids"]: (B, L) long.
        - batch["attention_mask"]: (B, L), 1 for real tokens, 0 for padding; optional (all ones).
        - batch["labels"]: (B, L), optional; overrides the targets derived from input_ids and
          attention_mask. Aligned with input_ids (the shift happens in the loss), ``ignore_index``
          where nothing is to be predicted.
        - ``forward`` output: "loss" (with grad) and detached "perplexity" = exp(loss) and
          "bits_per_token" = loss / ln 2.
        - ``encode_text`` output: (B, L, dim); ``embed`` output: (B, dim), the mean over real tokens.
    """

    spec = MethodSpec(
        display_name="GPT", data_kind="text", batch_keys=("input_ids", "attention_mask", "labels"), embeds=("text",),
        online_metric="val_perplexity", online_mode="min",
        objective_keys=frozenset({"ignore_index"}), derived=("vocab_size", "max_len"),
        token_batches="blocks", tokenizer="bpe", pooling="mean", accumulation="mean",
        accumulation_note="the loss is a mean over each micro-batch's tokens: exact when every micro-batch holds "
                          "equally many (packed blocks do)")

    def __init__(self, vocab_size: int = 4096, max_len: int = 128, dim: int = 128, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.config = TransformerConfig(vocab_size=vocab_size, max_len=max_len, dim=dim, depth=depth, heads=heads,
                                        mlp_ratio=mlp_ratio, dropout=dropout, causal=True, type_vocab_size=0)
        self.feature_dim = dim
        self.ignore_index = ignore_index
        self.transformer = Transformer(self.config)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.tok_emb.weight  # tied: one Parameter, two uses
        self.criterion = CausalLMLoss(ignore_index)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden = self.encode_text(batch)  # (B, L, D)
        logits = self.lm_head(hidden)  # (B, L, V)
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"]
            if batch.get("attention_mask") is not None:
                labels = labels.masked_fill(~batch["attention_mask"].bool(), self.ignore_index)  # (B, L)
        loss = self.criterion(logits, labels)
        nats = loss.detach()
        return {"loss": loss, "perplexity": nats.exp(), "bits_per_token": nats / math.log(2)}

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits at every position. (B, L) -> (B, L, vocab_size)."""
        return self.lm_head(self.transformer(input_ids, attention_mask))

    def encode_text(self, batch: dict[str, Tensor]) -> Tensor:
        """Final hidden state of every token (each sees only its prefix). (B, L) -> (B, L, dim)."""
        return self.transformer.forward_batch(batch)

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean of the final hidden states over real tokens, the sequence feature for a linear
        probe (GPT has no [CLS]; the last state alone sees everything but is tuned to predict one
        token). (B, L) -> (B, dim)."""
        return masked_mean(self.encode_text(batch), batch.get("attention_mask"))  # (B, D)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_id: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Continue each prompt in ``idx`` by up to ``max_new_tokens`` sampled tokens.

        Each step feeds the last ``max_len`` tokens (older ones are cropped, since there are no
        position embeddings beyond max_len) and samples from ``softmax(logits / temperature)``
        restricted to the ``top_k`` most likely tokens. ``temperature == 0`` or ``top_k == 1``
        is greedy decoding (argmax, deterministic). With ``eos_id``, a row that has produced it
        keeps producing ``eos_id`` and generation stops early once every row has, so the output
        can be shorter than ``L + max_new_tokens``. Runs in eval mode (no dropout) and restores
        the training flag afterwards. No KV cache: each step re-encodes the cropped context.

        Args:
            idx: prompts, all of the same length L >= 1 (left-align shorter ones yourself).
            max_new_tokens: tokens to append.
            temperature: > 0 to sample, 0 for greedy.
            top_k: sample among the k most likely tokens only; None for the whole vocabulary.
            eos_id: end-of-sequence token id, or None to always generate max_new_tokens.
            generator: random generator for reproducible sampling.

        Shape:
            - idx: (B, L) long
            - output: (B, L + T), T <= max_new_tokens, the prompt followed by the new tokens.
        """
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be a (B, L) tensor of prompt ids with L >= 1, got shape {tuple(idx.shape)}")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 or None, got "
                             f"{max_new_tokens}, {temperature} and {top_k}")
        was_training = self.training
        self.eval()
        try:
            finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,)
            for _ in range(max_new_tokens):
                logits = self.logits(idx[:, -self.config.max_len:])[:, -1].float()  # (B, V)
                next_id = self._sample(logits, temperature, top_k, generator)  # (B,)
                if eos_id is not None:
                    next_id = next_id.masked_fill(finished, eos_id)
                    finished |= next_id == eos_id
                idx = torch.cat([idx, next_id[:, None]], dim=1)  # (B, L + t + 1)
                if eos_id is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return idx

    @staticmethod
    def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
        """One token id per row from (B, V) logits. (B, V) -> (B,)."""
        if temperature == 0 or top_k == 1:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1), the k-th largest logit
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)  # (B, V)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """GPT has no state outside the optimizer."""
