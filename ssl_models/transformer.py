"""One pre-LayerNorm transformer stack, bidirectional for BERT and causal for GPT.

Attention is torch's ``F.scaled_dot_product_attention``, which dispatches to flash /
memory-efficient kernels on GPUs; nothing here writes the softmax by hand. The blocks are the
GPT-2 layout (Radford et al. 2019): LayerNorm before each residual branch and once more after
the last block, which trains stably without warm-up tricks at any depth. BERT originally used
post-LN blocks; this stack uses pre-LN for both so that one module serves both methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Marks the Linear layers that write into the residual stream (attention and MLP outputs).
_RESIDUAL_PROJECTION = "residual_projection"


@dataclass
class TransformerConfig:
    """Shape of a ``Transformer``; one field a line, with why it is there."""

    vocab_size: int = 4096  # the tokenizer's vocabulary; ids must lie in [0, vocab_size)
    max_len: int = 128  # learned position embeddings exist for positions [0, max_len)
    dim: int = 128  # residual stream width D, also the feature dimension a probe sees
    depth: int = 2  # number of blocks; also scales the init of residual projections
    heads: int = 4  # attention heads; dim must be divisible by heads
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * dim, as in BERT and GPT
    dropout: float = 0.0  # embeddings, attention weights and residual branches; 0.1 in both papers
    causal: bool = False  # True: position t attends to positions <= t only (GPT); False: all (BERT)
    type_vocab_size: int = 0  # segment (sentence A/B) embeddings: 2 for BERT's NSP pairs, 0 for none

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_len", "dim", "depth", "heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads}); change one of them")
        if self.mlp_ratio <= 0 or not 0.0 <= self.dropout < 1.0 or self.type_vocab_size < 0:
            raise ValueError(f"need mlp_ratio > 0, 0 <= dropout < 1 and type_vocab_size >= 0, got "
                             f"{self.mlp_ratio}, {self.dropout} and {self.type_vocab_size}")


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    Shape:
        - x: (B, L, D)
        - attn_mask: None, or bool (B, 1, L, L) with True where query i may attend to key j.
          Without a mask, ``config.causal`` selects SDPA's ``is_causal`` (the flash path).
        - output: (B, L, D)
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.heads, self.causal, self.dropout = config.heads, config.causal, config.dropout
        self.qkv = nn.Linear(config.dim, 3 * config.dim)  # one matmul for queries, keys and values
        self.proj = nn.Linear(config.dim, config.dim)
        setattr(self.proj, _RESIDUAL_PROJECTION, True)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)  # 3 x (B, L, D)
        q, k, v = (t.view(b, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attn_mask is None)  # (B, H, L, Dh)
        y = y.transpose(1, 2).reshape(b, length, dim)  # (B, L, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear, GELU, Linear. (B, L, D) -> (B, L, D)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = int(config.mlp_ratio * config.dim)
        self.fc = nn.Linear(config.dim, hidden)
        self.proj = nn.Linear(hidden, config.dim)
        setattr(self.proj, _RESIDUAL_PROJECTION, True)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))  # (B, L, D)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``. (B, L, D) -> (B, L, D)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(config.dim), SelfAttention(config)
        self.ln2, self.mlp = nn.LayerNorm(config.dim), MLP(config)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), attn_mask)
        return x + self.mlp(self.ln2(x))


def init_gpt2_(module: nn.Module, depth: int) -> None:
    """GPT-2 initialisation (Radford et al. 2019), in place, on every submodule of ``module``.

    Linear and Embedding weights ~ N(0, 0.02), biases 0, LayerNorm identity; Linear layers that
    write into the residual stream get std ``0.02 / sqrt(2 * depth)``, because each block adds
    two such branches and the residual stream's variance would otherwise grow with depth.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * depth) if getattr(m, _RESIDUAL_PROJECTION, False) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def masked_mean(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of ``hidden`` over real tokens. (B, L, D), (B, L) or None -> (B, D); all-padding rows give 0."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D)


class Transformer(nn.Module):
    """Token (+ segment) + learned position embeddings, ``depth`` pre-LN blocks, final LayerNorm.

    The same module is BERT's bidirectional encoder (``causal=False``, Devlin et al. 2019) and
    GPT's causal decoder (``causal=True``, Radford et al. 2018). Padding is masked out of the
    keys, so outputs at real tokens do not depend on what padded positions hold; every query
    also sees itself, so an all-padding row stays finite instead of softmax-ing over nothing.

    Args:
        config: a ``TransformerConfig``.

    Shape:
        - input_ids: (B, L) int32/int64 with L <= max_len and ids in [0, vocab_size).
        - attention_mask: (B, L), 1 / True for real tokens and 0 for padding; None means no padding.
        - token_type_ids: (B, L) segment ids in [0, type_vocab_size); None means all zeros.
        - output: (B, L, dim), final hidden states after the last LayerNorm.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.seg_emb = nn.Embedding(config.type_vocab_size, config.dim) if config.type_vocab_size else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.ln_f = nn.LayerNorm(config.dim)
        init_gpt2_(self, config.depth)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        self._check(input_ids, attention_mask, token_type_ids)
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)  # (L,)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)  # (B, L, D)
        if self.seg_emb is not None:
            x = x + self.seg_emb(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        x = self.drop(x)
        attn_mask = self._attn_mask(attention_mask, length)  # None or (B, 1, L, L)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)  # (B, L, D)

    def forward_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """``forward`` on a batch dict with "input_ids" and optional "attention_mask", "token_type_ids"."""
        if "input_ids" not in batch:
            raise ValueError(f"the batch needs an 'input_ids' (B, L) tensor of token ids; got keys {sorted(batch)}")
        return self(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))

    def _attn_mask(self, attention_mask: Tensor | None, length: int) -> Tensor | None:
        if attention_mask is None:
            return None  # SDPA's own is_causal (or no mask): the fastest kernels
        device = attention_mask.device
        keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): key j is a real token
        allowed = keys | torch.eye(length, dtype=torch.bool, device=device)  # (B, 1, L, L)
        if self.config.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
        return allowed

    def _check(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None) -> None:
        config = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be a (B, L) integer tensor, got shape {tuple(input_ids.shape)} "
                             f"and dtype {input_ids.dtype}; cast token ids to torch.long")
        if input_ids.shape[1] > config.max_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_len={config.max_len}; "
                             f"raise max_len or truncate sequences in the data pipeline")
        _check_range("input_ids", input_ids, config.vocab_size, "set vocab_size to the tokenizer's vocabulary size")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(t.shape)}")
        if token_type_ids is not None:
            if self.seg_emb is None:
                raise ValueError("token_type_ids given but the model has no segment embeddings; "
                                 "set type_vocab_size >= 1 or drop token_type_ids from the batch")
            _check_range("token_type_ids", token_type_ids, config.type_vocab_size, "raise type_vocab_size")


def _check_range(name: str, ids: Tensor, size: int, fix: str) -> None:
    """ValueError unless every id lies in [0, size). One host sync; an out-of-range index on a
    GPU would otherwise surface as an opaque device-side assert."""
    if ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got values from {low} to {high}; {fix}")
