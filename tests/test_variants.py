"""Optional variants: built on request, listed in the manifest, their effect on masks measured."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace

import numpy as np
import pytest

from conftest import needs_export_tools
from sam2serve.app import load_engine
from sam2serve.config import ServerConfig
from sam2serve.engines.contract import encoder_role
from sam2serve.engines.manifest import ManifestError, read_manifest, write_manifest
from sam2serve.engines.onnx_engine import OnnxEngine
from sam2serve.errors import StartupError
from sam2serve.images import synthetic_scene
from sam2serve.prompts.segmenter import model_key

pytestmark = needs_export_tools


@pytest.fixture(scope="module")
def variant_dir(tiny_engine_dir, tmp_path_factory):
    from sam2serve_export.variants import build_fp16, build_int8_encoder

    directory = tmp_path_factory.mktemp("variants") / "engines"
    shutil.copytree(tiny_engine_dir, directory)
    variants = {"encoder_int8": build_int8_encoder(directory), "decoder_fp16": build_fp16(directory, "decoder")}
    write_manifest(directory, replace(read_manifest(directory), variants=variants))
    return directory


def test_int8_encoder_drift_is_reported_on_masks(variant_dir):
    from sam2serve_export.variants import variant_mask_drift

    drift = variant_mask_drift(variant_dir, "encoder_int8", synthetic_scene())
    assert 0 < drift["image_embed_relative"] < 0.1  # quantised: not identical, not broken
    assert drift["mask_iou_mean"] > 0.95 and 0 <= drift["mask_pixels_flipped"] < 0.05
    assert read_manifest(variant_dir).variants["encoder_int8"].precision == "int8-dynamic"


def test_default_engine_is_never_a_variant(variant_dir):
    engine = OnnxEngine(variant_dir, providers=["CPUExecutionProvider"], warmup=False)
    assert engine.encoder_role == "encoder"
    assert read_manifest(variant_dir).engines["encoder"].file == "encoder.onnx"


def test_fp16_decoder_keeps_fp32_io_and_stays_close(variant_dir):
    import onnxruntime as ort

    base = OnnxEngine(variant_dir, providers=["CPUExecutionProvider"], warmup=False)
    fp16 = ort.InferenceSession(str(variant_dir / "decoder_fp16.onnx"), providers=["CPUExecutionProvider"])
    assert all(i.type == "tensor(float)" for i in fp16.get_inputs())
    features = base.encode(np.zeros((1, 3, 1024, 1024), np.float32))
    coords, labels = np.array([[[300.0, 400.0]]], np.float32), np.ones((1, 1), np.float32)
    ref = base.decode_all_tokens(features, coords, labels)[0]
    feeds = {"image_embed": features.image_embed, "high_res_feats_0": features.high_res_feats_0,
             "high_res_feats_1": features.high_res_feats_1, "point_coords": coords, "point_labels": labels,
             "mask_input": np.zeros((1, 1, 256, 256), np.float32), "has_mask_input": np.zeros(1, np.float32)}
    got = fp16.run(["masks"], feeds)[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-2


def test_int8_encoder_is_served_only_when_asked_and_says_so(variant_dir):
    from grpc_harness import ServerThread, quick_request
    from sam2serve.v1 import sam2serve_pb2 as pb

    x = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    fp32 = OnnxEngine(variant_dir, providers=["CPUExecutionProvider"], warmup=False)
    int8 = OnnxEngine(variant_dir, providers=["CPUExecutionProvider"], encoder_variant=encoder_role("int8"),
                      warmup=False)
    assert (fp32.info.encoder_precision, int8.info.encoder_precision) == ("fp32", "int8-dynamic")
    a, b = fp32.encode(x).image_embed, int8.encode(x).image_embed
    assert 0 < np.abs(a - b).max() / np.abs(a).max() < 0.1  # the other graph ran, and it is close
    assert model_key(fp32) != model_key(int8)  # a picture's image_id says which encoder embedded it

    server = ServerThread(ServerConfig(engines=variant_dir, encoder_precision="int8", providers="CPUExecutionProvider",
                                       workers=1), None)
    try:
        info = server.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        assert info.model.encoder_precision == "int8-dynamic"
        response = server.stub.AutoSegment(quick_request(), timeout=120)
        assert response.model.encoder_precision == "int8-dynamic"
    finally:
        server.stop()


def test_encoder_precision_errors_say_what_to_change(tiny_engine_dir):
    with pytest.raises(ManifestError, match="export --int8-encoder"):
        OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], encoder_variant=encoder_role("int8"),
                   warmup=False)
    with pytest.raises(StartupError, match="'int4' is not one of fp32, int8"):
        asyncio.run(load_engine(ServerConfig(engines=tiny_engine_dir, encoder_precision="int4")))
    with pytest.raises(StartupError, match="tensorrt backend"):
        asyncio.run(load_engine(ServerConfig(engines=tiny_engine_dir, encoder_precision="int8", backend="tensorrt")))
