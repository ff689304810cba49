"""PyTorch re-statement of DynamicID's attention processors, for parity on diffusers' UNets.

Written after the release's `SAA` processor and the rules of
/work/shared/reference/dynamicid-architecture.md, sharing no code with dynamicid_jax: the
state layout is dynamicid_torch_reference's SAProcessor / SAAProcessor (the release's keys),
the forward is diffusers' attention processor call. As in the release, the UNet's
`encoder_hidden_states` is [text tokens, identity 1's tokens, identity 2's, ...] and each
attn2 splits it at `Identity.text_tokens`; the per-call settings (boxes, layout, scale,
gating) sit in one `Identity` object every processor reads.

    state = Identity(text_tokens=77, latent_hw=(h, w), boxes=[[y0, x0, y1, x1], ...], ...)
    processors = install(unet, state, rank)      # on every attention, attn_processors order
    out = unet(x, t, torch.cat([text, ids.flatten(1, 2)], 1), added_cond_kwargs=...).sample

Rules, each written the release's way (python int() box cuts, explicit loops); a region may
be a mask instead of a box (cells whose last pixel is at least one half white, the rule of
dynamicid_jax/dynamicid/regions.py restated):
- activation weight: pre-softmax identity logits summed over heads and identity tokens,
  min-max per image (0 where the map is constant), strictly below `threshold` set to 0;
  while `layout_active`: + beta inside any box, / (beta + 1) outside every box;
- routing: a query inside some boxes attends only to those identities' tokens, a query
  outside every box to all of them (one softmax);
- out = to_out(z_text + id_scale * w * z_id) (+ LoRA on to_q/to_k/to_v/to_out, scale 1);
- gating off: w = 1 everywhere (routing unchanged);
- identity mixing (`mix` m, for one box and several identities): identity 0's logits times m,
  the others' times 1 - m, before the routing mask and the softmax (the architecture note's
  rule); the activation weight is read from the logits before mixing (dynamicid_jax's
  documented rule: mixing chooses whose features a query takes, not whether it takes any).

`install(..., saa_names=...)` restricts SAA to those attn2 layers (`model.saa_blocks`): the
others are plain cross-attention on the text tokens with their LoRA (the identity tokens the
UNet hands every attn2 are cut off: such a layer has no projections for them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

import dynamicid_torch_reference as ref


@dataclasses.dataclass
class Identity:
    """Per-call settings every processor reads. boxes: per image, per identity [y0, x0, y1, x1]
    (normalised); layout_active / beta per image (lists) or one value for all."""

    text_tokens: int
    tokens_per_id: int
    latent_hw: tuple[int, int]
    boxes: Sequence[Sequence[Sequence[float]]]
    layout_active: Sequence[bool] | bool = False
    beta: Sequence[float] | float = 0.0
    id_scale: float = 1.0
    gating: bool = True
    threshold: float = 0.3
    # per image, per identity: None (the box is the region) or a mask, (H, W) in [0, 1] on any
    # pixel grid (here the latent's), whose cells at a layer follow `mask_cells`
    masks: Optional[Sequence[Sequence[Optional[torch.Tensor]]]] = None
    mix: Optional[float] = None  # identity mixing weight m, one for all images; None: no mixing

    def per_image(self, value, b):
        return list(value) if isinstance(value, (list, tuple)) else [value] * b


def layer_grid(n_queries: int, latent_hw) -> tuple[int, int]:
    """The (h, w) of a layer with n_queries cells: ceil(H / 2^k) x ceil(W / 2^k) of the latent."""
    h, w = latent_hw
    for k in range(8):
        gh, gw = math.ceil(h / 2 ** k), math.ceil(w / 2 ** k)
        if gh * gw == n_queries:
            return gh, gw
    raise ValueError(f"no grid of {n_queries} cells under latent {latent_hw}")


def box_cells(box, grid) -> torch.Tensor:
    """(h*w,) bool, row-major: rows int(y0*h) <= r < int(y1*h), columns likewise (the release)."""
    h, w = grid
    y0, x0, y1, x1 = box
    cells = torch.zeros(h, w, dtype=torch.bool)
    for r in range(h):
        for c in range(w):
            cells[r, c] = int(y0 * h) <= r < int(y1 * h) and int(x0 * w) <= c < int(x1 * w)
    return cells.reshape(-1)


def mask_cells(mask: torch.Tensor, grid) -> torch.Tensor:
    """(h*w,) bool: cells of the layer grid whose last pixel of `mask` (H, W) is at least one
    half: row ceil((r+1)*H/h) - 1, column likewise (cell r spans [r/h, (r+1)/h) of the picture,
    pixel i [i/H, (i+1)/H)); the release's box cut generalised (dynamicid/regions.py)."""
    h, w = grid
    big_h, big_w = mask.shape
    cells = torch.zeros(h, w, dtype=torch.bool)
    for r in range(h):
        for c in range(w):
            cells[r, c] = float(mask[math.ceil((r + 1) * big_h / h) - 1, math.ceil((c + 1) * big_w / w) - 1]) >= 0.5
    return cells.reshape(-1)


def lora(layer: ref.LoRALinear, x):
    return layer.up(layer.down(x))


def heads_split(t, heads):
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)  # (b, heads, n, d)


def heads_merge(t):
    b, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, heads * d)


class LoRAProcessor(ref.SAProcessor):
    """attn1 (and an attn2 left out of SAA): plain attention with LoRA everywhere; an attn2
    attends to the text tokens only (`state.text_tokens` of the UNet's [text, identities])."""

    def __init__(self, hidden, cross, rank, state: Optional[Identity] = None):
        super().__init__(hidden, cross, rank)
        self.state = [state]  # a list: not a submodule, not in the state dict

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            context = hidden_states
        else:
            context = encoder_hidden_states[:, :self.state[0].text_tokens]
        q = attn.to_q(hidden_states) + lora(self.to_q_lora, hidden_states)
        k = attn.to_k(context) + lora(self.to_k_lora, context)
        v = attn.to_v(context) + lora(self.to_v_lora, context)
        q, k, v = (heads_split(t, attn.heads) for t in (q, k, v))
        z = heads_merge(torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v)
        return attn.to_out[1](attn.to_out[0](z) + lora(self.to_out_lora, z))


class SAAProcessorForward(ref.SAAProcessor):
    """attn2: the release's SAA with LoRA and the identity projections."""

    def __init__(self, hidden, cross, rank, state: Identity):
        super().__init__(hidden, cross, rank)
        self.state = [state]  # a list: not a submodule, not in the state dict

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        s = self.state[0]
        x, b, n = hidden_states, hidden_states.shape[0], hidden_states.shape[1]
        text, ids = encoder_hidden_states[:, :s.text_tokens], encoder_hidden_states[:, s.text_tokens:]
        q = heads_split(attn.to_q(x) + lora(self.to_q_lora, x), attn.heads)
        k = heads_split(attn.to_k(text) + lora(self.to_k_lora, text), attn.heads)
        v = heads_split(attn.to_v(text) + lora(self.to_v_lora, text), attn.heads)
        z = heads_merge(torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1) @ v)

        k_id, v_id = heads_split(self.to_k_ip(ids), attn.heads), heads_split(self.to_v_ip(ids), attn.heads)
        logits = q @ k_id.transpose(-1, -2) * attn.scale  # (b, heads, n, n_ids*T)
        n_ids = ids.shape[1] // s.tokens_per_id
        grid = layer_grid(n, s.latent_hw)
        active, beta = s.per_image(s.layout_active, b), s.per_image(s.beta, b)
        weights, routes = [], []
        for i in range(b):
            masks = s.masks[i] if s.masks is not None else [None] * n_ids
            inside = torch.stack([box_cells(s.boxes[i][j], grid) if masks[j] is None else mask_cells(masks[j], grid)
                                  for j in range(n_ids)])  # (n_ids, n)
            covered = inside.any(0)
            w = logits[i].sum(dim=(0, 2))
            span = w.max() - w.min()
            w = (w - w.min()) / span if span > 0 else torch.zeros_like(w)
            w = torch.where(w < s.threshold, torch.zeros_like(w), w)
            if active[i]:
                w = torch.where(covered, w + beta[i], w / (beta[i] + 1.0))
            weights.append(w if s.gating else torch.ones_like(w))
            allowed = torch.where(covered[None], inside, torch.ones_like(inside))  # (n_ids, n)
            routes.append(allowed.repeat_interleave(s.tokens_per_id, 0).T)  # (n, n_ids*T)
        if s.mix is not None:  # per token, its identity's factor: m for identity 0, 1 - m for the others
            factor = torch.tensor([s.mix if j == 0 else 1.0 - s.mix for j in range(n_ids)
                                   for _ in range(s.tokens_per_id)], dtype=logits.dtype)
            logits = logits * factor
        allowed = torch.stack(routes)[:, None]  # (b, 1, n, n_ids*T)
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        z_id = heads_merge(probs @ v_id)
        mixed = z + s.id_scale * torch.stack(weights)[..., None] * z_id
        return attn.to_out[1](attn.to_out[0](mixed) + lora(self.to_out_lora, mixed))


def install(unet, state: Identity, rank: int, seed: int = 0, saa_names: Optional[set] = None) -> torch.nn.ModuleList:
    """DynamicID's processors on every attention of a diffusers UNet, in its `attn_processors`
    order (attn2: SAA, or text-only attention with LoRA when saa_names is given and leaves it
    out; attn1: LoRA),
    random weights (LoRA up included, so every branch counts). Returns them as the release's
    SAA_module ModuleList (its state dict is the file's layout)."""
    modules = dict(unet.named_modules())
    processors = {}
    for name in unet.attn_processors:
        attn = modules[name[: -len(".processor")]]
        hidden, cross = attn.to_q.out_features, attn.to_k.in_features
        module_name = name[: -len(".processor")]
        if name.endswith("attn2.processor") and (saa_names is None or module_name in saa_names):
            processors[name] = SAAProcessorForward(hidden, cross, rank, state)
        else:
            processors[name] = LoRAProcessor(hidden, cross if name.endswith("attn2.processor") else None, rank,
                                             state)
    ordered = ref.randomise_(torch.nn.ModuleList(list(processors.values())), seed=seed)
    unet.set_attn_processor(processors)
    return ordered
