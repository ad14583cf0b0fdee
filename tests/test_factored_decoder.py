"""The factored decoder (export/sam2serve_export/factored.py) against Meta's MaskDecoder in torch.

Each identity is checked on its own in float64 (where an exact identity leaves only rounding, ~1e-15), with
sharpened weights (q/k projections and the image→token output projection ×4, so attention is peaky and any
cancellation in the LayerNorm variance expansion would show), then the whole decoder at several batch sizes and
prompt shapes, for every model size (decoder-only builds: the mask decoder is all these tests need).
"""

from __future__ import annotations

import copy

import pytest

from conftest import EXPORT_TOOLS, import_required, needs_export_tools

pytestmark = needs_export_tools
torch = import_required("torch", EXPORT_TOOLS)

from sam2serve_export import factored as fd  # noqa: E402
from sam2serve_export.checkpoint import build_untrained_decoder  # noqa: E402
from sam2serve_export.models import MODELS, get_model_spec  # noqa: E402

EXACT = 1e-12  # float64: identities hold up to rounding
FLOAT32 = 1e-5  # float32 against Meta's float32 (the export's bar is 1e-4)


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max())


class Decoder(torch.nn.Module):
    """What the factored modules read from a SAM 2 model: its prompt encoder (kept float32, as Meta's positional
    encoding computes in float32 whatever the module's dtype) and its mask decoder (in `dtype`)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32, sharpen: bool = False) -> None:
        super().__init__()
        self.sam_prompt_encoder = model.sam_prompt_encoder
        self.sam_mask_decoder = copy.deepcopy(model.sam_mask_decoder).to(dtype)
        self.dtype = dtype
        if sharpen:
            with torch.no_grad():
                for module in self.sam_mask_decoder.transformer.modules():
                    if hasattr(module, "q_proj"):
                        module.q_proj.weight.mul_(4.0)
                        module.k_proj.weight.mul_(4.0)
                for layer in self.sam_mask_decoder.transformer.layers:
                    layer.cross_attn_image_to_token.out_proj.weight.mul_(4.0)


@pytest.fixture(scope="module")
def tiny_decoder():
    return build_untrained_decoder(get_model_spec("sam2.1_hiera_tiny"), seed=0)


def features(decoder: Decoder, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    md = decoder.sam_mask_decoder
    dim = decoder.sam_prompt_encoder.embed_dim
    return (torch.randn(1, dim, 64, 64, generator=g, dtype=decoder.dtype),
            torch.randn(1, md.conv_s0.out_channels, 256, 256, generator=g, dtype=decoder.dtype),
            torch.randn(1, md.conv_s1.out_channels, 128, 128, generator=g, dtype=decoder.dtype))


def prompts(batch: int, points: int, box: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-frame prompts as SAM2ImagePredictor makes them: box corners first (labels 2, 3), then points."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(batch, points, 2, generator=g) * 1024.0
    labels = torch.randint(0, 2, (batch, points), generator=g).float()
    labels[:, 0] = 1.0
    if box:
        corners = torch.sort(torch.rand(batch, 2, 2, generator=g) * 1024.0, dim=1).values
        coords = torch.cat([corners, coords], dim=1)
        labels = torch.cat([torch.tensor([[2.0, 3.0]]).expand(batch, 2), labels], dim=1)
    return coords, labels


def sparse_embeddings(decoder: Decoder, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fd.embed_prompts(decoder.sam_prompt_encoder, coords, labels).to(decoder.dtype)


def metas(decoder: Decoder, feats: tuple[torch.Tensor, ...], sparse: torch.Tensor,
          chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's MaskDecoder.predict_masks (all tokens), in chunks of prompts (each prompt is independent)."""
    md, pe = decoder.sam_mask_decoder, decoder.sam_prompt_encoder
    image_pe = pe.get_dense_pe().to(decoder.dtype)
    masks, iou = [], []
    with torch.no_grad():
        for first in range(0, len(sparse), chunk):
            part = sparse[first:first + chunk]
            dense = pe.no_mask_embed.weight.to(decoder.dtype).reshape(1, -1, 1, 1).expand(len(part), -1, 64, 64)
            m, i, _, _ = md.predict_masks(feats[0], image_pe, part, dense, repeat_image=True,
                                          high_res_features=[feats[1], feats[2]])
            masks.append(m)
            iou.append(i)
    return torch.cat(masks), torch.cat(iou)


def factored(decoder: Decoder, feats: tuple[torch.Tensor, ...], sparse: torch.Tensor,
             trace: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ctx = fd.DecoderContext(decoder)(*feats)
        named = dict(zip(fd.CONTEXT_NAMES, ctx, strict=True))
        iou, *state = fd.FactoredPromptHead(decoder).from_sparse(tuple(named[n] for n in fd.PROMPT_HEAD_CONTEXT),
                                                                  sparse, trace)
        masks = fd.FactoredMaskHead(decoder)(*(named[n] for n in fd.MASK_HEAD_CONTEXT), *state, trace=trace)
    return masks, iou


def meta_intermediates(decoder: Decoder, feats: tuple[torch.Tensor, ...], sparse: torch.Tensor) -> dict:
    """Meta's transformer with hooks: each layer's (queries, keys), each norm4's input, the final queries and
    the first transposed convolution's output."""
    md = decoder.sam_mask_decoder
    tr = md.transformer
    seen: dict = {}
    hooks = [layer.register_forward_hook(lambda _m, _i, out, k=k: seen.__setitem__(f"layer{k}", out))
             for k, layer in enumerate(tr.layers)]
    hooks += [layer.norm4.register_forward_pre_hook(lambda _m, inp, k=k: seen.__setitem__(f"norm4_in{k}", inp[0]))
              for k, layer in enumerate(tr.layers)]
    hooks.append(tr.register_forward_hook(lambda _m, _i, out: seen.__setitem__("final", out)))
    hooks.append(md.output_upscaling[0].register_forward_hook(lambda _m, _i, out: seen.__setitem__("dc1", out)))
    try:
        seen["masks"], seen["iou"] = metas(decoder, feats, sparse)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.fixture(scope="module", params=[False, True], ids=["untrained", "sharpened"])
def traced(request, tiny_decoder):
    """One float64 batch through both decoders, with every intermediate."""
    decoder = Decoder(tiny_decoder, torch.float64, sharpen=request.param)
    feats = features(decoder, seed=1)
    coords, labels = prompts(2, 2, box=True, seed=2)
    sparse = sparse_embeddings(decoder, coords, labels)
    trace: dict = {}
    masks, iou = factored(decoder, feats, sparse, trace)
    return decoder, feats, trace, meta_intermediates(decoder, feats, sparse), masks, iou


def _image_part(decoder: Decoder, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Layer 1's norm4 input without the attention update, centred: y = centre(image + no-mask + out_proj bias)."""
    pe = decoder.sam_prompt_encoder
    l1 = decoder.sam_mask_decoder.transformer.layers[0]
    x0 = feats[0].flatten(2)[0].t() + pe.no_mask_embed.weight.to(decoder.dtype)
    y = x0 + l1.cross_attn_image_to_token.out_proj.bias
    return y - y.mean(-1, keepdim=True)


def test_layer1_token_to_image_attention_reads_the_precomputed_image_side(traced):
    """Identity 1: layer 1's keys (+PE), values and image queries do not depend on the prompt."""
    _, _, trace, meta, _, _ = traced
    assert relative(trace["queries_1"], meta["layer0"][0]) < EXACT


def test_layer1_image_update_is_low_rank_and_its_layernorm_expands(traced):
    """Identity 2: the image→token update is Σ a1·M1, rank ≤ H·T; LayerNorm's variance from ‖y‖², y·M1 and the
    Gram matrix of M1 gives layer 1's image tokens exactly."""
    decoder, feats, trace, meta, _, _ = traced
    l1 = decoder.sam_mask_decoder.transformer.layers[0]
    z = meta["norm4_in0"]
    var = z.var(-1, unbiased=False)
    assert relative(trace["inv1"], torch.rsqrt(var + l1.norm4.eps)) < EXACT
    y = _image_part(decoder, feats)
    low_rank = trace["a1s"].transpose(1, 2) @ trace["gm1"]
    rows = (y * l1.norm4.weight) * trace["inv1"][..., None] + low_rank + l1.norm4.bias
    assert relative(rows, meta["layer0"][1]) < EXACT
    assert trace["a1s"].shape[1] == 8 * (6 + 2 + 2 + 1)  # heads × tokens: 6 output tokens, 2 corners, 2 points, pad


def test_layer2_attention_scores_need_only_projected_queries(traced):
    """Identity 3: layer 2's token→image attention on layer 1's (never materialised) image tokens: scores from
    W_kᵀq against the precomputed image part, the low-rank part and the PE part."""
    _, _, trace, meta, _, _ = traced
    assert relative(trace["queries_2"], meta["layer1"][0]) < EXACT


def test_layer2_layernorm_from_the_gram_matrix(traced):
    """Identity 4: layer 2's image tokens γ2·(w·inv1 + coeffsᵀ mix)·inv2 + β2, with inv2 from ‖w‖², w·mix and the
    Gram matrix of mix (the norm's constant riding on head 0, whose weights sum to 1)."""
    decoder, feats, trace, meta, _, _ = traced
    l1, l2 = decoder.sam_mask_decoder.transformer.layers
    var = meta["norm4_in1"].var(-1, unbiased=False)
    assert relative(trace["inv2"], torch.rsqrt(var + l2.norm4.eps)) < EXACT
    w = _image_part(decoder, feats) * l1.norm4.weight
    w = w - w.mean(-1, keepdim=True)
    centred = w * trace["inv1"][..., None] + trace["coeffs"].transpose(1, 2) @ trace["mix"]
    rows = l2.norm4.weight * centred * trace["inv2"][..., None] + l2.norm4.bias
    assert relative(rows, meta["layer1"][1]) < EXACT


def test_final_attention_for_the_iou_token_alone_and_for_the_mask_tokens(traced):
    """Identity 5: the prompt head attends for the IoU token only; the mask head for the mask tokens."""
    decoder, _, trace, meta, _, iou = traced
    hs = meta["final"][0]
    md = decoder.sam_mask_decoder
    assert relative(trace["final_mask_tokens"], hs[:, 2:2 + md.num_mask_tokens]) < EXACT
    assert relative(iou, meta["iou"]) < EXACT


def test_first_transposed_convolution_is_a_per_position_map_with_a_precomputed_image_part(traced):
    """Identity 6: ConvTranspose2d(k=2, s=2) is a per-position linear map; its image part is in the context."""
    decoder, feats, trace, meta, masks, _ = traced
    dc1 = meta["dc1"] + feats[2]  # Meta: dc1(src) + feat_s1, before the LayerNorm
    b, c, h, w = dc1.shape
    ours = trace["dc1"].reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
    assert relative(ours, dc1) < EXACT
    weight = decoder.sam_mask_decoder.output_upscaling[0].weight
    x = torch.randn(2, weight.shape[0], 5, 7, dtype=weight.dtype)
    conv = torch.nn.functional.conv_transpose2d(x, weight, stride=2)
    as_map = (x.permute(0, 2, 3, 1) @ fd._conv_t_matrix(weight)).reshape(2, 5, 7, 2, 2, -1)
    assert relative(as_map.permute(0, 5, 1, 3, 2, 4).reshape(conv.shape), conv) < EXACT
    assert relative(masks, meta["masks"]) < EXACT


def test_gelu_is_torchs(tiny_decoder):
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    assert relative(fd.gelu(x), torch.nn.functional.gelu(x)) < EXACT


def _token_choice(decoder: Decoder, masks: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's choice for multimask (best of tokens 1..3 by IoU, as the generator ranks them) and for single
    mask (dynamic fallback)."""
    md = decoder.sam_mask_decoder
    single, _ = md._dynamic_multimask_via_stability(masks, iou)
    chosen = (single[:, 0, None] == masks).flatten(2).all(-1).float().argmax(-1)
    return iou[:, 1:].argmax(-1), chosen


@pytest.mark.parametrize(("batch", "points", "box"), [(1, 1, False), (3, 3, False), (3, 1, True)])
def test_whole_decoder_matches_metas_in_float32(tiny_decoder, batch, points, box):
    """Float32 against float32; batches of 64 and 257 through the exported graphs are in test_export_parity."""
    decoder = Decoder(tiny_decoder)
    feats = features(decoder, seed=batch)
    coords, labels = prompts(batch, points, box, seed=points)
    sparse = sparse_embeddings(decoder, coords, labels)
    masks, iou = factored(decoder, feats, sparse)
    ref_masks, ref_iou = metas(decoder, feats, sparse)
    assert relative(iou, ref_iou) < FLOAT32 and relative(masks, ref_masks) < FLOAT32
    for ours, ref in zip(_token_choice(decoder, masks, iou), _token_choice(decoder, ref_masks, ref_iou), strict=True):
        assert torch.equal(ours, ref)


def test_sharpened_weights_in_float32(tiny_decoder):
    """Peaky attention and large activations: float32 rounding of the expansions stays at the 1e-6 level."""
    decoder = Decoder(tiny_decoder, sharpen=True)
    feats = features(decoder, seed=3)
    coords, labels = prompts(4, 2, box=True, seed=4)
    sparse = sparse_embeddings(decoder, coords, labels)
    masks, iou = factored(decoder, feats, sparse)
    ref_masks, ref_iou = metas(decoder, feats, sparse)
    assert relative(iou, ref_iou) < FLOAT32 and relative(masks, ref_masks) < FLOAT32  # measured ≈ 1e-6


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_size(name):
    """Untrained decoders of every size and both versions (each config's decoder settings, its own seed)."""
    decoder = Decoder(build_untrained_decoder(get_model_spec(name), seed=len(name)))
    feats = features(decoder, seed=5)
    coords, labels = prompts(2, 2, box=False, seed=6)
    sparse = sparse_embeddings(decoder, coords, labels)
    masks, iou = factored(decoder, feats, sparse)
    ref_masks, ref_iou = metas(decoder, feats, sparse)
    assert relative(iou, ref_iou) < FLOAT32 and relative(masks, ref_masks) < FLOAT32
