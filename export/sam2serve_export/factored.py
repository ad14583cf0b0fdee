"""SAM 2's mask decoder with its image-side work done once per image: exact identities, no approximation.

`MaskDecoder.predict_masks` runs a two-way transformer over T prompt tokens and the N = 64×64 image tokens
for every prompt. In automatic mask generation every prompt shares one image, so:

- Layer 1's image side (keys + PE, values, image queries) does not depend on the prompt.
- Layer 1's image→token update of position i is Σ_(h,t) A1[(h,t), i] · M1[(h,t)]: a rank ≤ H·T update of a
  prompt-independent matrix (A1 the attention weights, M1 = values through the output projection).
- Everything later reads the updated image tokens through dot products with a few directions (attention
  scores, values, LayerNorm's mean and variance). The image part of each dot product is precomputed here
  (the "context"); the prompt part goes through the H·T attention coefficients. LayerNorm's variance
  expands as ‖ỹ‖² + 2·a·(M ỹ) + aᵀ(M Mᵀ)a; its per-position 1/σ is a scalar that rides along.
- The final token→image attention is needed for the IoU token only to rank a prompt; the mask tokens'
  attention, the upscaling and the hypernetworks run for prompts that need masks. The first transposed
  convolution is a per-position linear map, so its image part is precomputed too.

Layouts are chosen for ONNX Runtime on CPUs: per-prompt tensors are [B, H·T, N] (positions last, so
softmax over positions is one fused op and the image-side operands are [H, d, N]); the mask head works
positions-major so that LayerNorm and the second transposed convolution act on the last axis.

Every function here takes Meta's modules and calls their own sub-modules (linear layers, norms, MLPs)
wherever the computation is per token; tests compare each piece with its torch original.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Per-image context: names in the order the graphs exchange them (see sam2serve.engines.contract).
CONTEXT_NAMES = (
    "ca1_keys", "ca1_values", "cb1_queries", "cb1_cross", "image_sq_norm",
    "ca2_keys_img", "ca2_keys_pe", "ca2_values_img", "cb2_queries_img", "cb2_queries_pe",
    "ln2_cross", "ln2_vectors",
    "final_keys_img", "final_keys_pe", "final_values_img",
    "dc1_img", "dc1_bias", "dc2_bias",
)
PROMPT_STATE_NAMES = ("mask_queries", "coeffs", "inv_std", "mix")
PROMPT_HEAD_CONTEXT = CONTEXT_NAMES[:15]  # layers 1-2 and the final attention
MASK_HEAD_CONTEXT = CONTEXT_NAMES[12:]  # the final attention and the upscaling


def _heads_t(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, H·d] → [H, d, N] (the right operand of per-head scores q @ K)."""
    n, c = x.shape
    return x.reshape(n, heads, c // heads).permute(1, 2, 0).contiguous()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, H·d] → [H, N, d] (the right operand of per-head values A @ V)."""
    n, c = x.shape
    return x.reshape(n, heads, c // heads).transpose(0, 1).contiguous()


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H·d] → [B, H, T, d]."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


def _by_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H·d] → [H, B·T, d]: every prompt's queries of a head against that head's image-side operand in one
    product (ONNX Runtime then packs the shared operand once per batch, not once per prompt)."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).permute(2, 0, 1, 3).reshape(heads, b * t, c // heads)


def _from_heads(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[H, B·T, d] → [B, T, H·d]."""
    h, bt, d = x.shape
    return x.reshape(h, batch, bt // batch, d).permute(1, 2, 0, 3).reshape(batch, bt // batch, h * d)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] → [B, T, H·d]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _center(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=-1, keepdim=True)


def _scale(attn: nn.Module) -> float:
    """scaled_dot_product_attention's default scale for this attention's head size."""
    return 1.0 / math.sqrt(attn.internal_dim // attn.num_heads)


def _out_heads(attn: nn.Module) -> torch.Tensor:
    """The output projection split per head: [H, d, C], so that head h maps v (d) to v @ W[h] (C)."""
    w = attn.out_proj.weight  # [C, H·d]
    c, hd = w.shape
    return w.t().reshape(attn.num_heads, hd // attn.num_heads, c)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """nn.GELU() (erf form), written in the operand order ONNX Runtime fuses into one Gelu kernel (torch's own
    decomposition, 0.5·(1 + erf)·x, stays five elementwise passes)."""
    return x * 0.5 * (torch.erf(x / math.sqrt(2.0)) + 1.0)


def _softmax_tokens(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the token axis of [B, H, T, N]: with positions last, each step is a vector op over N
    (ONNX Runtime's Softmax on a middle axis transposes twice)."""
    e = torch.exp(scores - scores.amax(dim=2, keepdim=True))
    return e / e.sum(dim=2, keepdim=True)


class DecoderContext(nn.Module):
    """Image features → the decoder's prompt-independent context (once per image or crop)."""

    def __init__(self, sam2_model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam2_model.sam_prompt_encoder
        self.mask_decoder = sam2_model.sam_mask_decoder

    def forward(self, image_embed: torch.Tensor, high_res_feats_0: torch.Tensor,
                high_res_feats_1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        md, pe_mod = self.mask_decoder, self.prompt_encoder
        tr = md.transformer
        l1, l2, fa = tr.layers[0], tr.layers[1], tr.final_attn_token_to_image
        heads = fa.num_heads
        dtype = image_embed.dtype
        c = image_embed.shape[1]
        x0 = image_embed.flatten(2)[0].t() + pe_mod.no_mask_embed.weight  # [N, C] image + no-mask dense embedding
        pos = pe_mod.get_dense_pe().to(dtype).flatten(2)[0].t()  # [N, C]

        ca1, cb1 = l1.cross_attn_token_to_image, l1.cross_attn_image_to_token
        ca1_keys = _heads_t(ca1.k_proj(x0 + pos), heads)
        ca1_values = _heads(ca1.v_proj(x0), heads)
        cb1_queries = _heads_t(cb1.q_proj(x0 + pos) * _scale(cb1), heads)
        y = _center(x0 + cb1.out_proj.bias)  # centred image part of layer 1's norm4 input
        cb1_cross = _heads_t(y @ cb1.out_proj.weight, heads)
        image_sq_norm = (y * y).sum(-1)

        g1, b1 = l1.norm4.weight, l1.norm4.bias
        gy = y * g1  # layer 1's image tokens are gy / σ1 + (low rank) + b1
        ca2, cb2 = l2.cross_attn_token_to_image, l2.cross_attn_image_to_token
        ca2_keys_img = _heads_t(gy @ ca2.k_proj.weight.t(), heads)
        ca2_keys_pe = _heads_t(ca2.k_proj(pos + b1), heads)
        ca2_values_img = _heads(gy @ ca2.v_proj.weight.t(), heads)
        cb2_queries_img = _heads_t(gy @ cb2.q_proj.weight.t() * _scale(cb2), heads)
        cb2_queries_pe = _heads_t(cb2.q_proj(pos + b1) * _scale(cb2), heads)

        w = _center(gy)  # centred image part of layer 2's norm4 input (times σ1)
        # [2, H, d, N]: one product with the stacked values of both layers gives the cross terms of all 2HT rows
        ln2_cross = torch.stack([_heads_t((w * g1) @ cb1.out_proj.weight, heads),
                                 _heads_t(w @ cb2.out_proj.weight, heads)])
        ln2_vectors = torch.stack([(w * w).sum(-1), w @ (b1 + cb2.out_proj.bias), w @ g1])  # ‖w‖², w·const, w·γ1

        g2, b2 = l2.norm4.weight, l2.norm4.bias
        gw = w * g2
        final_keys_img = _heads_t(gw @ fa.k_proj.weight.t(), heads)
        final_keys_pe = _heads_t(fa.k_proj(pos + b2), heads)
        final_values_img = _heads(gw @ fa.v_proj.weight.t(), heads)

        dc1, _ln1, _, dc2, _ = md.output_upscaling
        d1 = _conv_t_matrix(dc1.weight)  # [C, 4·C/4]: (dy, dx, channel) per input position
        dc1_img = (gw @ d1).reshape(-1, 4, c // 4)  # [N, (dy, dx), C/4]
        side = math.isqrt(x0.shape[0])
        f1 = high_res_feats_1[0]
        f1 = f1.reshape(c // 4, side, 2, side, 2).permute(1, 3, 2, 4, 0).reshape(side * side, 4 * (c // 4))
        dc1_bias = (f1 + b2 @ d1 + dc1.bias.repeat(4)).reshape(-1, c // 4)
        f0 = high_res_feats_0[0]
        f0 = f0.reshape(c // 8, side, 2, 2, side, 2, 2).permute(1, 4, 2, 5, 3, 6, 0)
        dc2_bias = f0.reshape(side * side * 4, 4 * (c // 8)) + dc2.bias.repeat(4)
        return (ca1_keys, ca1_values, cb1_queries, cb1_cross, image_sq_norm,
                ca2_keys_img, ca2_keys_pe, ca2_values_img, cb2_queries_img, cb2_queries_pe,
                ln2_cross, ln2_vectors,
                final_keys_img, final_keys_pe, final_values_img,
                dc1_img, dc1_bias, dc2_bias)


def _conv_t_matrix(weight: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d(k=2, s=2) weight [Cin, Cout, 2, 2] as the per-position matrix [Cin, (dy, dx, Cout)]."""
    cin, cout = weight.shape[:2]
    return weight.permute(0, 2, 3, 1).reshape(cin, 4 * cout)


def embed_prompts(prompt_encoder: nn.Module, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
    """Sparse embeddings as SAM2ImagePredictor makes them: box corners are points labelled 2/3 placed first by
    the caller, and the prompt encoder always appends the padding point (it gets `boxes=None`)."""
    sparse, _ = prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
    return sparse


def output_tokens(md: nn.Module) -> torch.Tensor:
    weights = [md.obj_score_token.weight] if md.pred_obj_scores else []
    return torch.cat([*weights, md.iou_token.weight, md.mask_tokens.weight], dim=0)


class FactoredTransformer(nn.Module):
    """The two-way transformer up to (not including) the final token→image attention, on the context."""

    def __init__(self, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.md = mask_decoder

    def forward(self, ctx: tuple[torch.Tensor, ...], sparse: torch.Tensor,
                trace: dict[str, torch.Tensor] | None = None,
                final_token: int | None = None) -> tuple[torch.Tensor | None, ...]:
        """Returns (queries [B,T,C], query_pe [B,T,C], coeffs [B,R,N], inv_std [B,2,N], mix [B,R,C], final_low);
        R = 2HT. `final_token`: the token whose final attention follows; final_low [B, H, N] is the low-rank part of
        its scores (None without it). `trace` (tests) receives the intermediate quantities each identity produces."""
        (ca1_keys, ca1_values, cb1_queries, cb1_cross, image_sq_norm,
         ca2_keys_img, ca2_keys_pe, ca2_values_img, cb2_queries_img, cb2_queries_pe,
         ln2_cross, ln2_vectors) = ctx[:12]
        md = self.md
        tr = md.transformer
        l1, l2 = tr.layers[0], tr.layers[1]
        heads = tr.layers[0].cross_attn_token_to_image.num_heads
        b = sparse.shape[0]
        tokens = torch.cat([output_tokens(md).unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
        t = tokens.shape[1]
        c = tokens.shape[2]
        n = image_sq_norm.shape[-1]
        ht = heads * t

        # Layer 1: self-attention without PE, token→image attention on precomputed keys/values (heads outermost:
        # nothing per prompt is needed beyond the attention output).
        queries = l1.norm1(l1.self_attn(q=tokens, k=tokens, v=tokens))
        ca1 = l1.cross_attn_token_to_image
        q = _by_head(ca1.q_proj(queries + tokens) * _scale(ca1), heads)  # [H, B·T, d]
        attn = torch.softmax(q @ ca1_keys, dim=-1)  # [H, B·T, N]
        queries = l1.norm2(queries + ca1.out_proj(_from_heads(attn @ ca1_values, b)))
        queries = l1.norm3(queries + l1.mlp(queries))

        # Layer 1 image→token: attention over tokens per position, a rank-HT update of the image tokens.
        cb1 = l1.cross_attn_image_to_token
        k1 = _split(cb1.k_proj(queries + tokens), heads)
        v1 = _split(cb1.v_proj(queries), heads)  # [B, H, T, d]
        a1 = _softmax_tokens(k1 @ cb1_queries).reshape(b, ht, n)  # [B, HT, N]
        m1 = (v1 @ _out_heads(cb1)).reshape(b, ht, c)  # rows of the update, [B, HT, C]
        m1_mean = m1.mean(-1)
        m1c = m1 - m1_mean[..., None]
        # norm4's variance: ‖y‖² + 2 a·(M1 y) + aᵀ (M1c M1cᵀ) a  (y is centred, so M1 y = M1c y).
        cross1 = (2.0 * v1 @ cb1_cross).reshape(b, ht, n)
        quad1 = m1c @ m1c.transpose(1, 2) @ a1 + cross1
        var1 = (image_sq_norm + (a1 * quad1).sum(1)) / c  # [B, N]
        inv1 = torch.rsqrt(var1 + l1.norm4.eps)
        a1s = a1 * inv1[:, None]  # coefficients of the low-rank part of layer 1's image tokens
        gm1 = m1c * l1.norm4.weight  # layer 1 image tokens: rows of (y g1) inv1 + a1s @ gm1 + b1
        if trace is not None:
            trace.update(queries_1=queries, a1s=a1s, gm1=gm1, inv1=inv1)

        # Layer 2: self-attention, token→image attention on layer 1's image tokens.
        queries = l2.norm1(queries + l2.self_attn(q=queries + tokens, k=queries + tokens, v=queries))
        ca2 = l2.cross_attn_token_to_image
        q = _split(ca2.q_proj(queries + tokens) * _scale(ca2), heads)  # [B, H, T, d]
        q_low = q @ _split(gm1 @ ca2.k_proj.weight.t(), heads).transpose(2, 3)  # [B, H, T, HT]
        scores = (inv1[:, None, None] * (q @ ca2_keys_img + (q_low.reshape(b, ht, ht) @ a1).reshape(b, heads, t, n))
                  + q @ ca2_keys_pe)
        attn = torch.softmax(scores, dim=-1)  # [B, H, T, N]
        attn_s = attn * inv1[:, None, None]
        mixed = (attn_s.reshape(b, ht, n) @ a1.transpose(1, 2)).reshape(b, heads, t, ht)
        values = (attn_s @ ca2_values_img + mixed @ _split(gm1 @ ca2.v_proj.weight.t(), heads)
                  + _split(ca2.v_proj(l1.norm4.bias)[None, None], heads))
        queries = l2.norm2(queries + ca2.out_proj(_merge(values)))
        queries = l2.norm3(queries + l2.mlp(queries))
        if trace is not None:
            trace.update(queries_2=queries)

        # Layer 2 image→token: attention over tokens per position (image queries from layer 1's tokens).
        cb2 = l2.cross_attn_image_to_token
        k2 = _split(cb2.k_proj(queries + tokens), heads)
        v2 = _split(cb2.v_proj(queries), heads)
        k_low = k2 @ _split(gm1 @ cb2.q_proj.weight.t() * _scale(cb2), heads).transpose(2, 3)  # [B, H, T, HT]
        scores = (inv1[:, None, None] * (k2 @ cb2_queries_img + (k_low.reshape(b, ht, ht) @ a1).reshape(b, heads, t, n))
                  + k2 @ cb2_queries_pe)
        a2 = _softmax_tokens(scores).reshape(b, ht, n)
        m2 = (v2 @ _out_heads(cb2)).reshape(b, ht, c)

        # norm4 of layer 2: its input, centred, is w·inv1 + coeffsᵀ mix with coeffs = [a1s; a2]. Its constant
        # (β1 + out_proj bias) rides on head 0's rows of m2: the attention weights of a head sum to 1 over tokens.
        head0 = (torch.arange(heads, device=m2.device) == 0).to(m2.dtype)[:, None].expand(heads, t).reshape(ht, 1)
        m2 = m2 + head0 * (l1.norm4.bias + cb2.out_proj.bias)
        mix = _center(torch.cat([gm1, m2], dim=1))  # [B, 2HT, C]
        coeffs = torch.cat([a1s, a2], dim=1)  # [B, 2HT, N]
        # ‖input‖² = inv1²‖w‖² + 2 inv1 Σ coeffs·(mix w) + coeffsᵀ G coeffs with G = mix mixᵀ (the whole of G: one
        # product, which the final attention's rows share, beats the upper block triangle's three). w is centred,
        # so mix·w = m·w: for the gm1 rows v1·(W_o^T(γ1 w)) - mean(m1)(γ1·w), for the m2 rows v2·(W_o^T w), plus
        # w·const on head 0 whose weights sum to 1.
        # The cross terms of all 2HT rows come from one product, laid out as coeffs; inv1 scales their sum only.
        gram = mix @ mix.transpose(1, 2)
        rows = gram
        if final_token is not None:
            # The low-rank part of the final attention's scores for one token reads coeffs too: one product.
            fa = tr.final_attn_token_to_image
            qf = fa.q_proj(queries[:, final_token:final_token + 1] + tokens[:, final_token:final_token + 1])
            kf = _split((mix * l2.norm4.weight) @ fa.k_proj.weight.t(), heads)  # [B, H, R, d]
            rows = torch.cat([gram, (_split(qf * _scale(fa), heads) @ kf.transpose(2, 3)).reshape(b, heads, -1)], 1)
        products = rows @ coeffs  # [B, 2HT (+ H), N]
        cross = (torch.stack([v1, v2], dim=1) @ ln2_cross).reshape(b, 2 * ht, n)  # [B, 2HT, N]
        mean_term = (m1_mean[:, None] @ a1s)[:, 0]  # Σ_r a1s_r mean(m1_r), [B, N]
        sq = (inv1 * (inv1 * ln2_vectors[0] + 2.0 * (ln2_vectors[1] - mean_term * ln2_vectors[2]
                                                     + (coeffs * cross).sum(1)))
              + (coeffs * products[:, :2 * ht]).sum(1))
        inv2 = torch.rsqrt(sq / c + l2.norm4.eps)
        if trace is not None:
            trace.update(coeffs=coeffs, mix=mix, inv2=inv2)
        final_low = products[:, 2 * ht:] if final_token is not None else None
        return queries, tokens, coeffs, torch.stack([inv1, inv2], dim=1), mix, final_low


def final_attention(md: nn.Module, final_ctx: tuple[torch.Tensor, ...], queries: torch.Tensor, query_pe: torch.Tensor,
                    coeffs: torch.Tensor, inv_std: torch.Tensor, mix: torch.Tensor,
                    low: torch.Tensor | None = None) -> torch.Tensor:
    """The final token→image attention + norm for the given tokens (queries, query_pe [B, Tq, C]), on layer 2's
    image tokens: rows γ2·(w·inv1 + coeffsᵀ mix)·inv2 + β2. `final_ctx`: the context's final_* tensors.
    Scores and attention are laid out heads outermost, [H, B, Tq, N], so that the image-side products take every
    prompt at once; only the low-rank part is per prompt."""
    final_keys_img, final_keys_pe, final_values_img = final_ctx
    tr = md.transformer
    fa = tr.final_attn_token_to_image
    g2, b2 = tr.layers[1].norm4.weight, tr.layers[1].norm4.bias
    heads = fa.num_heads
    b, tq, _ = queries.shape
    r, n = coeffs.shape[1:]
    inv1, inv2 = inv_std[None, :, 0:1], inv_std[None, :, 1:2]  # [1, B, 1, N]
    q = fa.q_proj(queries + query_pe) * _scale(fa)  # [B, Tq, C]
    gmix = mix * g2
    if low is None:  # else the low-rank part of the scores, [B, H·Tq, N], came with layer 2's quadratic form
        k_low = _split(gmix @ fa.k_proj.weight.t(), heads)
        low = (_split(q, heads) @ k_low.transpose(2, 3)).reshape(b, heads * tq, r) @ coeffs
    low = low.reshape(b, heads, tq, n).transpose(0, 1)  # [H, B, Tq, N]
    qh = _by_head(q, heads)  # [H, B·Tq, d]
    scores = (inv2 * (inv1 * (qh @ final_keys_img).reshape(heads, b, tq, n) + low)
              + (qh @ final_keys_pe).reshape(heads, b, tq, n))
    attn = torch.softmax(scores, dim=-1) * inv2  # [H, B, Tq, N]
    image_values = _from_heads((attn * inv1).reshape(heads, b * tq, n) @ final_values_img, b)  # [B, Tq, C]
    # coeffs @ attnᵀ keeps the big operand on the left (no transposed copy of coeffs)
    per_prompt = attn.transpose(0, 1).reshape(b, heads * tq, n)
    mixed = (coeffs @ per_prompt.transpose(1, 2)).transpose(1, 2).reshape(b, heads, tq, r)
    values = image_values + _merge(mixed @ _split(gmix @ fa.v_proj.weight.t(), heads)) + fa.v_proj(b2)
    return tr.norm_final_attn(queries + fa.out_proj(values))


class FactoredPromptHead(nn.Module):
    """Context + prompts → IoU predictions of all mask tokens [B, M] and the state the mask head needs."""

    def __init__(self, sam2_model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam2_model.sam_prompt_encoder
        self.mask_decoder = sam2_model.sam_mask_decoder
        self.transformer = FactoredTransformer(self.mask_decoder)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """args: the PROMPT_HEAD_CONTEXT tensors, then point_coords [B, P, 2] and point_labels [B, P]."""
        *ctx, point_coords, point_labels = args
        return self.from_sparse(tuple(ctx), embed_prompts(self.prompt_encoder, point_coords, point_labels))

    def from_sparse(self, ctx: tuple[torch.Tensor, ...], sparse: torch.Tensor,
                    trace: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """From sparse prompt embeddings [B, P+1, C] (tests run it in float64; the prompt encoder stays float32)."""
        md = self.mask_decoder
        s = 1 if md.pred_obj_scores else 0
        queries, tokens, coeffs, inv_std, mix, low = self.transformer(ctx, sparse, trace, final_token=s)
        iou_token = final_attention(md, ctx[12:15], queries[:, s:s + 1], tokens[:, s:s + 1], coeffs, inv_std, mix,
                                    low)
        iou = md.iou_prediction_head(iou_token[:, 0])
        mask_queries = queries[:, s + 1:s + 1 + md.num_mask_tokens]
        return iou, mask_queries, coeffs, inv_std, mix


class FactoredMaskHead(nn.Module):
    """Context + prompt-head state → low-res logits of all mask tokens [B, M, 256, 256]."""

    def __init__(self, sam2_model: nn.Module) -> None:
        super().__init__()
        self.mask_decoder = sam2_model.sam_mask_decoder

    def forward(self, *args: torch.Tensor, trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """args: the MASK_HEAD_CONTEXT tensors, then PROMPT_STATE_NAMES. `trace` (tests) receives the mask tokens
        after the final attention and the first transposed convolution's output."""
        *ctx, mask_queries, coeffs, inv_std, mix = args
        md = self.mask_decoder
        tr = md.transformer
        m = md.num_mask_tokens
        tokens = md.mask_tokens.weight.unsqueeze(0).expand(mask_queries.shape[0], -1, -1)
        final = final_attention(md, tuple(ctx[:3]), mask_queries, tokens, coeffs, inv_std, mix)
        hyper = torch.stack([md.output_hypernetworks_mlps[i](final[:, i]) for i in range(m)], dim=1)  # [B, M, C/8]

        dc1_img, dc1_bias, dc2_bias = ctx[3:]
        dc1, ln1, act1, dc2, act2 = md.output_upscaling
        g2 = tr.layers[1].norm4.weight
        b, _, n = coeffs.shape
        assert isinstance(act1, nn.GELU) and isinstance(act2, nn.GELU) and act1.approximate == "none"
        inv1, inv2 = inv_std[:, 0, :, None], inv_std[:, 1, :, None]  # [B, N, 1]
        d1 = _conv_t_matrix(dc1.weight)
        mix_d = (mix * g2) @ d1  # [B, R+1, 4·C/4]
        # dc1 of layer 2's image tokens, per position: ((w γ2) D inv1 + coeffs @ mix γ2 D) inv2 + β2 D + bias
        # coeffs transposed explicitly, then scaled: MatMul on a transposed left operand is slow in ONNX Runtime
        low = ((coeffs.transpose(1, 2) * inv2) @ mix_d).reshape(b, 4 * n, -1)
        up = (((inv1 * inv2)[..., None] * dc1_img).reshape(b, 4 * n, -1) + dc1_bias) + low  # [B, (N, dy, dx), C/4]
        if trace is not None:
            trace.update(final_mask_tokens=final, dc1=up)
        up = gelu(F.layer_norm(up, ln1.weight.shape, ln1.weight, ln1.bias, ln1.eps))
        up = gelu(up @ _conv_t_matrix(dc2.weight) + dc2_bias)  # [B, 4N, (dy, dx, C/8)]
        side = math.isqrt(n)
        # Mask tokens first, then the pixel shuffle (y, x, dy1, dx1, dy2, dx2) → (y, dy1, dy2, x, dx1, dx2): two
        # transposes with fewer, longer runs are faster in ONNX Runtime than one eight-axis permutation.
        logits = (up.reshape(b, 16 * n, -1) @ hyper.transpose(1, 2)).transpose(1, 2)  # [B, M, pixels]
        logits = logits.reshape(b, m, side, side, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return logits.reshape(b, m, 4 * side, 4 * side)
