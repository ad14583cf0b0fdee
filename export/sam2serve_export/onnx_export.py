"""torch → ONNX with the dynamo exporter (opset 18: asking for 17 silently yields 18 anyway)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import torch

from sam2serve.engines.contract import (
    DECODER_CONTEXT_INPUTS,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    MASK_HEAD_OUTPUTS,
    PROMPT_HEAD_OUTPUTS,
    PROMPT_INPUTS,
    PROMPT_STATE,
)
from sam2serve.engines.manifest import TensorSpec

from .factored import (
    CONTEXT_NAMES,
    MASK_HEAD_CONTEXT,
    PROMPT_HEAD_CONTEXT,
    DecoderContext,
    FactoredMaskHead,
    FactoredPromptHead,
)
from .wrappers import ImageEncoder, PromptDecoder, example_decoder_inputs

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


def export_factored_decoder(model: torch.nn.Module, directory: Path, opset: int = DEFAULT_OPSET) -> None:
    """decoder_context.onnx, prompt_head.onnx, mask_head.onnx: the decoder without mask input, its image-side
    work once per image (see factored.py)."""
    features = example_decoder_inputs(model, batch=2, points=2)[:3]
    context_module = DecoderContext(model).eval()
    _export(context_module, features, directory / "decoder_context.onnx", opset, DECODER_CONTEXT_INPUTS,
            CONTEXT_NAMES, dynamic_shapes=None)
    with torch.no_grad():
        context = dict(zip(CONTEXT_NAMES, context_module(*features), strict=True))
    # Example batch/points of 2 keep the exporter from specialising those axes to 1.
    coords, labels = example_decoder_inputs(model, batch=2, points=2)[3:5]
    batch = torch.export.Dim("batch", min=1, max=MAX_DECODER_BATCH)
    points = torch.export.Dim("points", min=1, max=MAX_POINTS_PER_PROMPT)
    prompt_head = FactoredPromptHead(model).eval()
    prompt_args = (*(context[n] for n in PROMPT_HEAD_CONTEXT), coords, labels)
    _export(prompt_head, prompt_args, directory / "prompt_head.onnx", opset,
            (*PROMPT_HEAD_CONTEXT, *PROMPT_INPUTS), PROMPT_HEAD_OUTPUTS,
            ((*[None] * len(PROMPT_HEAD_CONTEXT), {0: batch, 1: points}, {0: batch, 1: points}),))
    with torch.no_grad():
        state = prompt_head(*prompt_args)[1:]
    rank = torch.export.Dim("rank", min=2, max=64 * MAX_POINTS_PER_PROMPT)
    _export(FactoredMaskHead(model).eval(), (*(context[n] for n in MASK_HEAD_CONTEXT), *state),
            directory / "mask_head.onnx", opset, (*MASK_HEAD_CONTEXT, *PROMPT_STATE), MASK_HEAD_OUTPUTS,
            ((*[None] * len(MASK_HEAD_CONTEXT), {0: batch}, {0: batch, 1: rank}, {0: batch}, {0: batch, 1: rank}),))


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
