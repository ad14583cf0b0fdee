"""An engine directory is served only when its manifest, files and graphs agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import needs_export_tools
from sam2serve.engines.manifest import ManifestError, read_manifest, sha256_file
from sam2serve.engines.onnx_engine import OnnxEngine

pytestmark = needs_export_tools


@pytest.fixture
def engine_copy(tiny_engine_dir, tmp_path) -> Path:
    copy = tmp_path / "engines"
    shutil.copytree(tiny_engine_dir, copy)
    return copy


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_valid_directory_opens_and_runs(tiny_engine_dir, caplog):
    engine = OnnxEngine(tiny_engine_dir, providers=["CPUExecutionProvider"], warmup=False)
    assert "CPUExecutionProvider" in engine.active_providers
    assert "UNTRAINED WEIGHTS" in caplog.text
    features = engine.encode(np.zeros((1, 3, 1024, 1024), np.float32))
    coords = np.array([[[512.0, 512.0]], [[100.0, 900.0]], [[10.0, 10.0]]], np.float32)
    out = engine.decode(features, coords, np.ones((3, 1), np.float32))
    assert out.low_res_logits.shape == (3, 3, 256, 256) and out.iou_predictions.shape == (3, 3)
    single = engine.decode(features, coords, np.ones((3, 1), np.float32), mask_input=out.low_res_logits[:, :1],
                           multimask=False)
    assert single.low_res_logits.shape == (3, 1, 256, 256)


def test_missing_engine_file(engine_copy):
    (engine_copy / "decoder.onnx").unlink()
    with pytest.raises(ManifestError, match=r"decoder engine file .*decoder.onnx is missing"):
        OnnxEngine(engine_copy, warmup=False)


def test_changed_engine_file_fails_its_checksum(engine_copy):
    path = engine_copy / "encoder.onnx"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"has SHA-256 .* the manifest says .* rebuild the engines"):
        OnnxEngine(engine_copy, warmup=False)


def test_truncated_engine_file_is_reported_by_size(engine_copy):
    path = engine_copy / "encoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ManifestError, match="has 1000 bytes"):
        OnnxEngine(engine_copy, warmup=False)


def test_graph_with_wrong_shapes_is_refused(engine_copy):
    """A decoder whose graph disagrees with the manifest's shapes, even with a correct checksum."""
    manifest = read_manifest(engine_copy)
    declared = manifest.engines["decoder"]
    shapes = {t.name: t.shape for t in declared.inputs} | {"image_embed": [1, 256, 32, 32]}
    inputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, shapes[t.name]) for t in declared.inputs]
    outputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, t.shape) for t in declared.outputs]
    repeats = helper.make_tensor("repeats", TensorProto.INT64, [4], [1, 4, 1, 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Tile", ["mask_input", "repeats"], ["masks"]),
             helper.make_node("ReduceMean", ["point_coords", "axes"], ["mean_xy"], keepdims=0),
             helper.make_node("Concat", ["mean_xy", "mean_xy"], ["iou_predictions"], axis=1)]
    graph = helper.make_graph(nodes, "wrong", inputs, outputs, initializer=[repeats, axes])
    path = engine_copy / "decoder.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))

    def point_at_new_file(raw):
        raw["engines"]["decoder"].update(sha256=sha256_file(path), bytes=path.stat().st_size)

    _edit_manifest(engine_copy, point_at_new_file)
    with pytest.raises(ManifestError, match=r"decoder input image_embed has shape \[1, 256, 32, 32\]"):
        OnnxEngine(engine_copy, warmup=False)


def test_manifest_shape_that_disagrees_with_the_graph(engine_copy):
    _edit_manifest(engine_copy, lambda raw: raw["engines"]["encoder"]["outputs"][0].update(shape=[1, 256, 32, 32]))
    with pytest.raises(ManifestError, match=r"encoder output image_embed has shape \[1, 256, 64, 64\]"):
        OnnxEngine(engine_copy, warmup=False)


def test_static_axis_where_manifest_promises_a_dynamic_one(engine_copy):
    _edit_manifest(engine_copy, lambda raw: raw["engines"]["decoder"]["inputs"][3].update(shape=[1, 1, 2]))
    with pytest.raises(ManifestError, match="decoder input point_coords has shape"):
        OnnxEngine(engine_copy, warmup=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw.update(format_version=99), "format_version 99 is not supported"),
        (lambda raw: raw.pop("engines"), "malformed manifest"),
        (lambda raw: raw["weights"].update(origin="magic"), "weights.origin 'magic'"),
        (lambda raw: raw["engines"].pop("decoder"), "no decoder engine listed"),
    ],
)
def test_malformed_manifests(engine_copy, edit, message):
    _edit_manifest(engine_copy, edit)
    with pytest.raises(ManifestError, match=message):
        read_manifest(engine_copy)


def test_not_an_engine_directory(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="not an engine directory"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_unavailable_provider_is_named(tiny_engine_dir):
    with pytest.raises(ManifestError, match=r"CUDAExecutionProvider.* not available"):
        OnnxEngine(tiny_engine_dir, providers=["CUDAExecutionProvider"], warmup=False)


def test_check_engines_cli(tiny_engine_dir, capsys, engine_copy):
    from sam2serve.cli import main

    assert main(["check-engines", str(tiny_engine_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == "untrained" and report["trained"] is False and report["encoder_precision"] == "fp32"
    # the init container asks for the int8 encoder when the chart serves it: engines without it are refused
    assert main(["check-engines", str(tiny_engine_dir), "--encoder-precision", "int8"]) == 2
    assert "export --int8-encoder" in capsys.readouterr().err
    (engine_copy / "encoder.onnx").unlink()
    assert main(["check-engines", str(engine_copy)]) == 2
    assert "is missing" in capsys.readouterr().err
