"""The tokenfold dense early-fusion model in plain eager PyTorch, shared by the benchmark references
(train_step.py: a training step; prefill.py: prefill latency).

The architecture mirrors crates/tokenfold-model/src/model.rs and ops.rs:

- token embedding (vocab, d), std 0.02; tied output head (logits = final_norm(h) @ embed.T);
- early fusion: patches -> patch_embed (Linear with bias, weight std 0.02, bias 0) + 2-D learned positions
  row[r] + col[c] (raster order), written over the token embeddings of each sample's image span;
- per block: pre-norm RMSNorm, bias-free q/k/v/o projections, QK-norm (RMSNorm over head_dim), RoPE on
  q and k at each token's sequence index, attention with an additive mask (0 visible, -1e9 hidden: key j
  is visible to query i iff j is a real token and j <= i, or both are image tokens), residual; pre-norm
  RMSNorm, bias-free SwiGLU MLP, residual. o_proj and down_proj start at std 0.02 / sqrt(2 n_layers);
- final RMSNorm applied only to the rows whose logits are needed (NativeModel::logits).

The model is written the way a competent PyTorch user would write it (nn.Module, nn.Linear, nn.RMSNorm,
F.scaled_dot_product_attention), not hand-tuned: it is a yardstick, not a competitor.

Both scripts also take from here what they do around the model: init_torch (threads and seeds),
random_batch (the model's inputs for a report's layout) and build_model (refused unless its parameter
count is the report's).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# common.py sits next to this file, on sys.path with it.
from common import fail

# Same masked value as ops.rs: finite so that a fully masked row could never give NaN, and large enough
# to vanish after the softmax.
MASKED = -1e9


def init_torch(threads: int, seed: int) -> torch.Generator:
    """Sets torch's intra-op threads and seeds its global generator (the weights); returns a generator
    for the random inputs, seeded apart from it."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1)


def check_config(cfg: dict) -> None:
    """Only the dense early-fusion model is reproduced here; refuse anything else rather than time a
    different model."""
    for field in ("moe", "vision"):
        if cfg.get(field) is not None:
            fail(f"the report's model has '{field}'; this reference only covers the dense early-fusion model")
    if cfg["d_model"] % cfg["n_heads"] or (cfg["d_model"] // cfg["n_heads"]) % 2:
        fail("d_model / n_heads must be an even integer (RoPE rotates halves)")


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/head_dim), (max_positions, head_dim/2). Computed in float64
    and rounded to float32, as ops.rs does, so both implementations rotate by the same angles."""
    half = head_dim // 2
    inv_freq = theta ** (-(2.0 * torch.arange(half, dtype=torch.float64)) / head_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-halves RoPE (not interleaved pairs): (x1, x2) -> (x1 c - x2 s, x1 s + x2 c), as ops.rs."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d // n_heads
        # model.rs `linear()` builds candle Linear layers with no bias.
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        # QK-norm: one RMSNorm weight of size head_dim each for queries and keys, shared by all heads.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else None

    def forward(self, x, cos, sin, bias, cache: list | None = None):
        b, t, d = x.shape
        heads = lambda proj: proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # Norm before rotation, as model.rs `queries_keys` does.
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # The KV cache entry of this layer, (b, h, t, hd) each: rotated keys and values, as model.rs
            # stores them in LayerCache.
            cache.append((k, v))
        # Default scale 1/sqrt(head_dim), as ops.rs `attention`.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["d_model"], cfg["norm_eps"]
        self.attn_norm = nn.RMSNorm(d, eps=eps)
        self.attn = Attention(d, cfg["n_heads"], cfg["qk_norm"], eps)
        self.mlp_norm = nn.RMSNorm(d, eps=eps)
        self.gate_proj = nn.Linear(d, cfg["d_ff"], bias=False)
        self.up_proj = nn.Linear(d, cfg["d_ff"], bias=False)
        self.down_proj = nn.Linear(cfg["d_ff"], d, bias=False)

    def forward(self, x, cos, sin, bias, cache: list | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, bias, cache)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class NativeModel(nn.Module):
    """`forward(batch)` is the training loss (train_step.py); `prefill(batch)` the prefill (prefill.py)."""

    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["d_model"]
        self.cfg = cfg
        self.n_patches = cfg["image_grid"] ** 2
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], d)
        # patch_embed.weight (d, patch_dim) and patch_embed.bias (d): the same two tensors as model.rs.
        self.patch_embed = nn.Linear(cfg["patch_dim"], d, bias=True)
        self.image_row = nn.Parameter(torch.empty(cfg["image_grid"], d))
        self.image_col = nn.Parameter(torch.empty(cfg["image_grid"], d))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layers"]))
        self.norm = nn.RMSNorm(d, eps=cfg["norm_eps"])
        # Untied head only when the config says so; the tied one reuses embed_tokens.weight.
        self.lm_head = None if cfg["tie_embeddings"] else nn.Linear(d, cfg["vocab_size"], bias=False)
        cos, sin = rope_tables(d // cfg["n_heads"], cfg["max_positions"], cfg["rope_theta"])
        # Buffers, not parameters: fixed tables, excluded from the parameter count and the optimizer.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = 0.02
        # GPT-2 style smaller residual-branch outputs, as Block::new in model.rs.
        out_std = std / math.sqrt(2.0 * self.cfg["n_layers"])
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, 0.0, out_std)
            elif name == "patch_embed.bias":
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                # embed_tokens, patch_embed, image_row/col, q/k/v, gate/up (and an untied lm_head).
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)  # RMSNorm gains

    def hidden_states(self, batch: dict, cache: list | None = None) -> torch.Tensor:
        """Embedding and every layer: the hidden states (b, t, d) after the last layer. With `cache` (a
        list), each layer appends its (k, v), as model.rs `forward` fills a KvCache."""
        tokens = batch["tokens"]
        b, t = tokens.shape
        if t > self.cfg["max_positions"]:
            raise ValueError(f"sequence of {t} exceeds model.max_positions {self.cfg['max_positions']}")
        positions = torch.arange(t)
        starts = batch["image_starts"]  # (b,), -1 for a sample without an image
        has_image = starts >= 0
        offset = positions[None, :] - starts[:, None]  # index of each token inside its image span
        is_image = has_image[:, None] & (offset >= 0) & (offset < self.n_patches)

        h = self.embed_tokens(tokens)
        if batch["any_image"]:  # host-side flag, as model.rs skips the patch path for text-only batches
            n, d = self.n_patches, h.shape[-1]
            pos2d = (self.image_row[:, None, :] + self.image_col[None, :, :]).reshape(n, d)
            patches = self.patch_embed(batch["patches"]) + pos2d  # (b, n, d)
            # Patch k of a sample goes to position start + k; gather lines them up with the sequence so
            # that a torch.where (no data-dependent shapes) swaps them in.
            index = offset.clamp(0, n - 1)[..., None].expand(b, t, d)
            h = torch.where(is_image[..., None], patches.gather(1, index), h)

        # Additive mask (b, 1, t, t), built from metadata like SeqState::attention_bias.
        valid = positions[None, :] < batch["lengths"][:, None]
        causal = positions[None, :] <= positions[:, None]
        visible = valid[:, None, :] & (causal[None] | (is_image[:, :, None] & is_image[:, None, :]))
        bias = torch.zeros(b, 1, t, t).masked_fill_(~visible[:, None], MASKED)

        cos, sin = self.rope_cos[:t], self.rope_sin[:t]  # positions are sequence indices
        for layer in self.layers:
            h = layer(h, cos, sin, bias, cache)
        return h

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits (n, vocab) of the flat rows `rows` of hidden (b, t, d). The final norm is applied after
        the selection, as NativeModel::logits does."""
        b, t, d = hidden.shape
        selected = hidden.reshape(b * t, d).index_select(0, rows)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.norm(selected) @ head.T

    def forward(self, batch: dict) -> torch.Tensor:
        """The training loss: the mean over samples of each sample's mean NLL over its targets."""
        b = batch["tokens"].shape[0]
        h = self.hidden_states(batch)
        # Logits only where they are needed: row j-1 predicts target token j.
        logits = self.logits(h, batch["rows"])
        nll = F.cross_entropy(logits, batch["target_ids"], reduction="none")
        # Mean NLL per sample over its targets, then the mean over all b samples (a sample without targets
        # contributes 0 but still counts, as the membership matmul in model.rs does).
        per_sample = torch.zeros(b).index_add(0, batch["row_sample"], nll * batch["row_weight"])
        return per_sample.mean()

    def prefill(self, batch: dict) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """A prefill, as model.rs `prefill`: every layer over the prompts, keeping each layer's keys and
        values (the KV cache), and the logits (b, vocab) at each sample's last real token
        (`batch["rows"]`, one flat row per sample). Returns (logits, cache)."""
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        h = self.hidden_states(batch, cache)
        return self.logits(h, batch["rows"]), cache


def random_batch(cfg: dict, lengths: list[int], starts: list[int], seq_len: int,
                 generator: torch.Generator) -> dict:
    """The inputs `hidden_states` reads, for b = len(lengths) samples padded to seq_len: random token ids
    and patches (values do not change the work), image starts (-1 for a sample without an image) and real
    lengths. The callers check the layout and add what their own pass needs (rows, targets)."""
    b, n_patches = len(lengths), cfg["image_grid"] ** 2
    tokens = torch.randint(cfg["vocab_size"], (b, seq_len), generator=generator)
    patches = torch.rand(b, n_patches, cfg["patch_dim"], generator=generator)
    patches[torch.tensor(starts) < 0] = 0.0  # the Rust batch holds zeros for samples without an image
    return {
        "tokens": tokens,
        "patches": patches,
        "image_starts": torch.tensor(starts),
        "any_image": any(start >= 0 for start in starts),
        "lengths": torch.tensor(lengths),
    }


def build_model(cfg: dict, report_parameters: int) -> tuple[NativeModel, int]:
    """NativeModel(cfg) and its parameter count, refused unless that count is the tokenfold report's:
    anything else is not the model tokenfold timed."""
    model = NativeModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())  # counts the tied embedding once
    print(f"parameters: PyTorch {n_params}, tokenfold {report_parameters}")
    if n_params != report_parameters:
        fail(f"parameter counts differ (PyTorch {n_params} vs tokenfold {report_parameters}): "
             "the reference does not build the same model")
    return model, n_params
