"""torch → ONNX with the dynamo exporter (opset 18: asking for 17 silently yields 18 anyway)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch

from sam2serve.engines.contract import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    MASK_HEAD_INPUTS,
    MASK_HEAD_OUTPUTS,
    PROMPT_HEAD_INPUTS,
    PROMPT_HEAD_OUTPUTS,
)
from sam2serve.engines.manifest import TensorSpec

from .wrappers import ImageEncoder, MaskHead, PromptDecoder, PromptHead, example_decoder_inputs

DEFAULT_OPSET = 18
MAX_DECODER_BATCH = 4096
MAX_POINTS_PER_PROMPT = 64


def export_encoder(model: torch.nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> None:
    size = model.image_size
    _export(ImageEncoder(model).eval(), (torch.zeros(1, 3, size, size),), path, opset,
            ENCODER_INPUTS, ENCODER_OUTPUTS, dynamic_shapes=None)


def _prompt_dynamic_shapes() -> dict:
    batch = torch.export.Dim("batch", min=1, max=MAX_DECODER_BATCH)
    points = torch.export.Dim("points", min=1, max=MAX_POINTS_PER_PROMPT)
    return {
        "image_embed": None,
        "high_res_feats_0": None,
        "high_res_feats_1": None,
        "point_coords": {0: batch, 1: points},
        "point_labels": {0: batch, 1: points},
        "mask_input": {0: batch},
        "has_mask_input": None,
    }


def export_decoder(model: torch.nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> None:
    # Example batch/points of 2 keep the exporter from specialising those axes to 1.
    args = example_decoder_inputs(model, batch=2, points=2)
    _export(PromptDecoder(model).eval(), args, path, opset, DECODER_INPUTS, DECODER_OUTPUTS,
            _prompt_dynamic_shapes())


def export_decoder_heads(model: torch.nn.Module, directory: Path, opset: int = DEFAULT_OPSET) -> None:
    """prompt_head.onnx + mask_head.onnx: the decoder split so that masks are made only where needed."""
    args = example_decoder_inputs(model, batch=2, points=2)
    _export(PromptHead(model).eval(), args, directory / "prompt_head.onnx", opset, PROMPT_HEAD_INPUTS,
            PROMPT_HEAD_OUTPUTS, _prompt_dynamic_shapes())
    with torch.no_grad():
        _, mask_tokens, image_tokens = PromptHead(model).eval()(*args)
    batch = torch.export.Dim("batch", min=1, max=MAX_DECODER_BATCH)
    _export(MaskHead(model).eval(), (image_tokens, mask_tokens, args[1], args[2]), directory / "mask_head.onnx",
            opset, MASK_HEAD_INPUTS, MASK_HEAD_OUTPUTS,
            {"image_tokens": {0: batch}, "mask_tokens": {0: batch}, "high_res_feats_0": None,
             "high_res_feats_1": None})


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int,
            inputs: tuple[str, ...], outputs: tuple[str, ...], dynamic_shapes: dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chatter = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=list(inputs),
            output_names=list(outputs), dynamic_shapes=dynamic_shapes, verbose=False,
        )
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path))


def onnx_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    model = onnx.load(str(path), load_external_data=False)

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        return TensorSpec(value.name, dtype, shape)

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]
