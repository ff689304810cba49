"""PyTorch re-statements of the DynamicID release's modules, for parity and key-layout tests.

Written from the release's structure (module names and Sequential indices are what its
state dicts hold); the IMR attention uses standard multi-head attention (the release's
3-D permute crashes). Sizes are arguments so the tests can build tiny and full-size ones.
"""

import torch
from torch import nn


def multi_head(q, k, v, heads):
    """q (b, l, h*d), k/v (b, m, h*d) -> (b, l, h*d); q and k each scaled d**-0.25 (release)."""
    b, l, inner = q.shape
    d = inner // heads
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scale = d ** -0.25
    weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1)
    return (weight @ v).permute(0, 2, 1, 3).reshape(b, l, inner)


def feed_forward(dim, mult=4):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        return self.to_out(multi_head(self.to_q(latents), k, v, self.heads))


class MultAttention(nn.Module):
    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x):
        x = self.norm1(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        return self.to_out(multi_head(self.to_q(x), k, v, self.heads))


class FacePerceiverResampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult=4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            [nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)]
        )

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ProjPlusModel(nn.Module):
    def __init__(self, cross_attention_dim, id_embeddings_dim, clip_embeddings_dim, num_tokens, depth=4, heads=None,
                 dim_head=64):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, 2 * id_embeddings_dim), nn.GELU(),
                                  nn.Linear(2 * id_embeddings_dim, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            cross_attention_dim, depth, dim_head, heads or cross_attention_dim // 64, clip_embeddings_dim,
            cross_attention_dim,
        )

    def forward(self, id_embeds, clip_embeds):
        x = self.norm(self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim))
        return self.perceiver_resampler(x, clip_embeds)


class IMR(nn.Module):
    def __init__(self, dim=1024, dim_head=64, heads=16, num_queries=4, embedding_dim=768, txt_dim=768,
                 landmark_dim=None, ff_mult=4, depth=1):
        super().__init__()
        self.num_queries, self.dim = num_queries, dim
        fused = (landmark_dim or embedding_dim) + txt_dim
        self.feature_fusion = nn.Sequential(nn.LayerNorm(fused), nn.Linear(fused, dim), nn.GELU(), nn.LayerNorm(dim),
                                            nn.Linear(dim, num_queries * dim), nn.GELU())
        self.norm_in, self.proj_in = nn.LayerNorm(embedding_dim), nn.Linear(embedding_dim, dim)
        self.proj_out, self.norm_out = nn.Linear(dim, embedding_dim), nn.LayerNorm(dim)
        block = lambda: nn.ModuleList([PerceiverAttention(dim, dim_head, heads), MultAttention(dim, dim_head, heads),  # noqa: E731
                                       feed_forward(dim, ff_mult)])
        self.disentangleNet = nn.ModuleList([block() for _ in range(depth)])
        self.entangleNet = nn.ModuleList([block() for _ in range(depth)])

    def forward(self, x, src_landmark, tgt_landmark, src_txt_embed, tgt_txt_embed):
        """One source (batch 1), several targets (batch k): the release's call."""
        latents = self.feature_fusion(torch.cat([torch.cat([src_landmark, src_txt_embed], 1),
                                                 torch.cat([tgt_landmark, tgt_txt_embed], 1)], 0))
        latents = latents.reshape(latents.shape[0], self.num_queries, self.dim)
        src, tgt = latents[:1], latents[1:]
        x = self.proj_in(self.norm_in(x))
        for attn1, attn2, ff in self.disentangleNet:
            x = attn1(src, x) + x
            x = attn2(x) + x
            x = ff(x) + x
        x = x.repeat(tgt.shape[0], 1, 1)
        for attn1, attn2, ff in self.entangleNet:
            x = attn1(tgt, x) + x
            x = attn2(x) + x
            x = ff(x) + x
        return self.proj_out(self.norm_out(x))


class ConvBN(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride, padding, residual=False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout))
        self.act, self.residual = nn.ReLU(), residual

    def forward(self, x):
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class KeyPointEncoder(nn.Module):
    def __init__(self, channels=(16, 32, 64, 128, 256, 512), num_residual=(0, 2, 3, 2, 2, 1), embedding_dim=768):
        super().__init__()
        stages, cin = [], 1
        for i, (c, r) in enumerate(zip(channels, num_residual)):
            first = ConvBN(cin, c, 7, 1, 3) if i == 0 else ConvBN(cin, c, 3, 2, 1)
            stages.append(nn.Sequential(first, *[ConvBN(c, c, 3, 1, 1, residual=True) for _ in range(r)]))
            cin = c
        stages.append(nn.Sequential(ConvBN(cin, cin, 3, 1, 0), ConvBN(cin, embedding_dim, 1, 1, 0)))
        self.blocks = nn.ModuleList(stages)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class LoRALinear(nn.Module):
    """diffusers' LoRALinearLayer state layout: down (r, in), up (out, r), no biases."""

    def __init__(self, d_in, d_out, rank):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)


class SAProcessor(nn.Module):
    """attn1 processor: LoRA only."""

    def __init__(self, hidden, cross, rank):
        super().__init__()
        self.to_q_lora = LoRALinear(hidden, hidden, rank)
        self.to_k_lora = LoRALinear(cross or hidden, hidden, rank)
        self.to_v_lora = LoRALinear(cross or hidden, hidden, rank)
        self.to_out_lora = LoRALinear(hidden, hidden, rank)


class SAAProcessor(SAProcessor):
    """attn2 processor: LoRA plus the identity projections."""

    def __init__(self, hidden, cross, rank):
        super().__init__(hidden, cross, rank)
        self.to_k_ip = nn.Linear(cross, hidden, bias=False)
        self.to_v_ip = nn.Linear(cross, hidden, bias=False)


def randomise_(module, seed=0):
    """Random weights everywhere (LayerNorm/BatchNorm affine and statistics included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:  # Linear/Conv weights: unit-gain scale so deep stacks stay O(1)
                p.copy_(noise * p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # LayerNorm/BatchNorm scales
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module
