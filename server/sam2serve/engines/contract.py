"""The I/O contract between exported graphs and the runtime: tensor names, in order."""

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embed", "high_res_feats_0", "high_res_feats_1")
# Encoder precisions a server can be asked for, and the engine role each runs. int8 is opt-in: built by `export
# --int8-encoder` (dynamic int8 MatMuls), ~25 % faster on a 2-core AVX2 CPU; its masks differ slightly from Meta's.
ENCODER_ROLES = {"fp32": "encoder", "int8": "encoder_int8"}
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
# The factored decoder (no mask input): the same computation as "decoder", with its image-side work done once per
# image. "decoder_context" turns the image features into the decoder's prompt-independent context (tensors whose
# names the graph itself declares: heads take the ones they need by name); "prompt_head" runs the two-way
# transformer for a batch of prompts and predicts the IoU of every mask token, handing its per-prompt state to
# "mask_head", which makes the low-res logits of every mask token, run only for prompts that need masks.
FACTORED_ROLES = ("decoder_context", "prompt_head", "mask_head")
DECODER_CONTEXT_INPUTS = ("image_embed", "high_res_feats_0", "high_res_feats_1")
PROMPT_INPUTS = ("point_coords", "point_labels")  # [B, P, 2] model-frame points (box corners labelled 2, 3), [B, P]
PROMPT_STATE = ("mask_queries", "coeffs", "inv_std", "mix")  # prompt head → mask head, per prompt
PROMPT_HEAD_OUTPUTS = ("iou_predictions", *PROMPT_STATE)
MASK_HEAD_OUTPUTS = ("masks",)


def encoder_role(precision: str) -> str:
    """The engine role serving `precision` ("fp32" or "int8"); ValueError for any other."""
    try:
        return ENCODER_ROLES[precision]
    except KeyError:
        raise ValueError(f"encoder_precision {precision!r} is not one of {', '.join(ENCODER_ROLES)}") from None
