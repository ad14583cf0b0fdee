"""The I/O contract between exported graphs and the runtime: tensor names, in order."""

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embed", "high_res_feats_0", "high_res_feats_1")
DECODER_INPUTS = (
    "image_embed",
    "high_res_feats_0",
    "high_res_feats_1",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
)
DECODER_OUTPUTS = ("masks", "iou_predictions")
# Backbone feature-map sizes for a 1024x1024 input, finest first (SAM2ImagePredictor._bb_feat_sizes).
FEATURE_SIZES = ((256, 256), (128, 128), (64, 64))
# Optional split of the decoder (same computation as "decoder"): the prompt head runs the two-way transformer
# and the IoU head; the mask head upscales and applies the hypernetworks only for prompts that need masks.
PROMPT_HEAD_INPUTS = DECODER_INPUTS
PROMPT_HEAD_OUTPUTS = ("iou_predictions", "mask_tokens", "image_tokens")
MASK_HEAD_INPUTS = ("image_tokens", "mask_tokens", "high_res_feats_0", "high_res_feats_1")
MASK_HEAD_OUTPUTS = ("masks",)
