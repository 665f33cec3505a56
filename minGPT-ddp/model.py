"""A GPT language model: token + position embeddings, a stack of pre-norm transformer
blocks, and a head that predicts the next token.

Attention goes through F.scaled_dot_product_attention(is_causal=True): PyTorch picks the
fastest kernel for the hardware (FlashAttention on recent GPUs, a fused kernel on CPUs)
and the causal flag means position t only ever attends to positions <= t.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """The architecture knobs you choose; the vocabulary size comes from the data."""
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 128  # longest context the model sees (learned position embeddings)
    dropout: float = 0.1
    bias: bool = False  # biases in Linear and LayerNorm: GPT-2 had them, without is a bit faster


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"model.n_embd ({cfg.n_embd}) must be a multiple of model.n_head ({cfg.n_head})")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        # One matmul makes queries, keys and values for all heads at once.
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        batch, seq_len, n_embd = x.shape
        # (batch, seq, 3*embd) -> three tensors of (batch, heads, seq, head_dim)
        q, k, v = self.qkv(x).view(batch, seq_len, 3, self.n_head, n_embd // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, seq_len, n_embd)  # heads side by side again
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.down = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down(F.gelu(self.up(x), approximate="tanh")))  # GPT-2's GELU


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.norm_mlp = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm_attn(x))
        return x + self.mlp(self.norm_mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, cfg.n_embd)
        self.position_embedding = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        # Weight tying: reading a token in and predicting it out share one matrix. Fewer
        # parameters, and it trains better on small data (Press & Wolf, 2017).
        self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2: every block adds two residual projections to the stream; scale their init
        # down so the residual stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, include_position_embedding: bool = True) -> int:
        # Shared (tied) tensors are counted once: parameters() yields each tensor once.
        n = sum(p.numel() for p in self.parameters())
        return n if include_position_embedding else n - self.position_embedding.weight.numel()

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 per weight (2 forward, 4 backward) plus the attention score/value matmuls."""
        cfg = self.cfg
        attention = 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
        return 6 * self.num_params(include_position_embedding=False) + attention

    def forward(self, idx, targets=None):
        seq_len = idx.shape[1]
        if seq_len > self.cfg.block_size:
            raise ValueError(f"sequence of {seq_len} tokens is longer than model.block_size={self.cfg.block_size}")
        positions = torch.arange(seq_len, device=idx.device)
        x = self.embedding_dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits, None
        # The loss in float32 even when the weights compute in bf16/fp16 (FSDP's mixed precision
        # has no autocast to do it): a bf16 loss is rounded to 3 significant digits, and in fp16
        # the gradient scaler's 65536 x the loss's gradient overflows on the way back. Under
        # autocast it costs nothing.
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def optimizer_param_groups(self, weight_decay: float):
        """Decay the matrices (embeddings, linear weights); leave norms and biases alone:
        decaying a gain or an offset towards zero only hurts."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, generator=None):
        """Append max_new_tokens sampled tokens to idx (batch, seq); returns the longer tensor."""
        if temperature <= 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"temperature must be above 0 and top_k at least 1, not {temperature} and {top_k}")
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.block_size:]  # the model can't look further back than this
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth_best] = -float("inf")
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx
