"""torch modules with exactly the graphs we export: SAM2ImagePredictor.set_image and its prompt decoder."""

from __future__ import annotations

import torch
from torch import nn

from sam2serve.engines.contract import FEATURE_SIZES


class ImageEncoder(nn.Module):
    """Normalised image [1,3,1024,1024] → the three feature maps `set_image` stores.

    no_mem_embed is added and conv_s0/conv_s1 are applied (inside `forward_image`), as in the predictor.
    """

    def __init__(self, sam2_model: nn.Module) -> None:
        super().__init__()
        self.model = sam2_model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone_out = self.model.forward_image(image)
        _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        feats = [
            feat.permute(1, 2, 0).reshape(1, -1, *size)
            for feat, size in zip(vision_feats[::-1], FEATURE_SIZES[::-1], strict=True)
        ][::-1]
        return feats[2], feats[0], feats[1]


class PromptDecoder(nn.Module):
    """Features + point prompts (+ optional low-res mask) → logits of all mask tokens and their IoU.

    Inputs follow `SAM2ImagePredictor._predict` after `_prep_prompts`: point coordinates in the 1024×1024
    model input frame, labels 1/0 (positive/negative; -1 padding). The padding point of the prompt
    encoder is added inside the graph, as Meta's predictor does for point-only prompts.

    Outputs are *all* mask tokens (`masks [B,4,256,256]` logits, `iou_predictions [B,4]`): token 0 is the
    single-mask output, tokens 1..3 the multimask output. The selection `MaskDecoder.forward` makes
    (multimask slice, or dynamic fallback via stability) is done by the runtime, so one graph serves both
    the automatic generator's multimask pass and its single-mask m2m refinement.
    """

    def __init__(self, sam2_model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam2_model.sam_prompt_encoder
        self.mask_decoder = sam2_model.sam_mask_decoder

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, _ = self.prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        dense = _dense_embedding(self.prompt_encoder, mask_input, has_mask_input)
        masks, iou_predictions, _, _ = self.mask_decoder.predict_masks(
            image_embeddings=image_embed,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=True,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        return masks, iou_predictions


def example_decoder_inputs(
    model: nn.Module, batch: int, points: int, seed: int = 0, with_mask: bool = False, box: bool = False
) -> tuple[torch.Tensor, ...]:
    """Random but well-formed decoder inputs (features of the right scale, prompts inside the frame). With `box`,
    each prompt starts with a box's corners labelled 2 and 3, as SAM2ImagePredictor._predict puts them."""
    g = torch.Generator().manual_seed(seed)
    dim = model.sam_prompt_encoder.embed_dim
    hr0 = model.sam_mask_decoder.conv_s0.out_channels
    hr1 = model.sam_mask_decoder.conv_s1.out_channels
    coords = torch.rand(batch, points, 2, generator=g) * 1024.0
    labels = torch.randint(0, 2, (batch, points), generator=g).to(torch.float32)
    labels[:, 0] = 1.0
    if box:
        corners = torch.sort(torch.rand(batch, 2, 2, generator=g) * 1024.0, dim=1).values
        coords = torch.cat([corners, coords], dim=1)
        labels = torch.cat([torch.tensor([[2.0, 3.0]]).expand(batch, 2), labels], dim=1)
    mask_input = torch.randn(batch, 1, 256, 256, generator=g) * 4.0
    return (
        torch.randn(1, dim, 64, 64, generator=g),
        torch.randn(1, hr0, 256, 256, generator=g),
        torch.randn(1, hr1, 128, 128, generator=g),
        coords,
        labels,
        mask_input if with_mask else torch.zeros_like(mask_input),
        torch.tensor([1.0 if with_mask else 0.0]),
    )


def _dense_embedding(prompt_encoder: nn.Module, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
    """The prompt encoder's dense embedding, with the mask input switched on or off by a graph input."""
    mask_embed = prompt_encoder.mask_downscaling(mask_input)
    no_mask_embed = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    return has_mask_input * mask_embed + (1.0 - has_mask_input) * no_mask_embed
