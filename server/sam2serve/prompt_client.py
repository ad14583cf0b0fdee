"""`sam2serve segment IMAGE --point X,Y[,LABEL] ... --box X0,Y0,X1,Y1`: prompted masks from a running
server, written as one picture per mask, metadata, and an overlay of each prompt set's best mask."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import grpc
import numpy as np

from .client import OUTPUT_FORMATS, Metadata, call_server, set_image
from .domain import MaskRecord
from .outputs import encode_image, overlay
from .v1 import sam2serve_pb2 as pb
from .v1 import sam2serve_pb2_grpc as pb_grpc

_FOREGROUND, _BACKGROUND = (40, 220, 40), (230, 40, 40)


def _numbers(text: str, counts: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def parse_point(text: str) -> pb.PointPrompt:
    """'X,Y' (foreground) or 'X,Y,LABEL' (1 foreground, 0 background), in pixels."""
    values = _numbers(text, (2, 3), "X,Y or X,Y,LABEL")
    point = pb.PointPrompt(x=values[0], y=values[1])
    if len(values) == 3:
        point.label = int(values[2])
    return point


def parse_box(text: str) -> pb.BoxPrompt:
    """'X0,Y0,X1,Y1' in pixels."""
    x0, y0, x1, y1 = _numbers(text, (4,), "X0,Y0,X1,Y1")
    return pb.BoxPrompt(x_min=x0, y_min=y0, x_max=x1, y_max=y1)


def build_prompt_request(args: argparse.Namespace) -> pb.SegmentRequest:
    request = pb.SegmentRequest(points=args.point or [], boxes=args.box or [], multimask_output=not args.single_mask,
                                output_format=OUTPUT_FORMATS[args.format], return_rle=True)
    set_image(request, args.image)
    return request


def prompt_overlay(rgb: np.ndarray, request: pb.SegmentRequest, response: pb.SegmentResponse) -> np.ndarray:
    """The photo with each prompt set's best mask in its palette colour, the boxes and the clicks."""
    records = []
    for result in response.results:
        m = result.masks[result.best_index]
        records.append(MaskRecord(rle={"size": list(m.rle.size), "counts": m.rle.counts}, area=m.area,
                                  bbox=list(m.bbox), predicted_iou=m.score, stability_score=0.0, point_coords=[],
                                  crop_box=[0, 0, response.width, response.height]))
    picture = overlay(rgb, records)
    for b in request.boxes:
        cv2.rectangle(picture, (round(b.x_min), round(b.y_min)), (round(b.x_max), round(b.y_max)), (255, 255, 255), 2)
    radius = max(4, round(min(response.width, response.height) / 150))
    for p in request.points:
        colour = _BACKGROUND if p.HasField("label") and p.label == 0 else _FOREGROUND
        cv2.circle(picture, (round(p.x), round(p.y)), radius, colour, -1, lineType=cv2.LINE_AA)
        cv2.circle(picture, (round(p.x), round(p.y)), radius, (255, 255, 255), 1, lineType=cv2.LINE_AA)
    return picture


def write_prompt_outputs(request: pb.SegmentRequest, response: pb.SegmentResponse, rgb: np.ndarray | None,
                         out: Path, fmt: str) -> list[Path]:
    masks_dir = out / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    for result in response.results:
        for m in result.masks:
            (masks_dir / m.image.file_name).write_bytes(m.image.data)
    written = [masks_dir]
    if rgb is not None:
        picture = encode_image(prompt_overlay(rgb, request, response), fmt, "overlay")
        (out / picture.file_name).write_bytes(picture.data)
        written.append(out / picture.file_name)
    from google.protobuf.json_format import MessageToDict

    meta = MessageToDict(response, preserving_proto_field_name=True)
    for result in meta.get("results", []):
        for m in result.get("masks", []):
            m.get("image", {}).pop("data", None)
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))
    written.append(out / "metadata.json")
    return written


def prompt_command(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, request: pb.SegmentRequest, metadata: Metadata) -> pb.SegmentResponse:
        return pb_grpc.PromptSegmentServiceStub(channel).Segment(request, timeout=args.timeout, metadata=metadata)

    done = call_server(args, build_prompt_request, call)
    if isinstance(done, int):
        return done
    request, response = done
    rgb = None
    if request.WhichOneof("image") == "image_bytes":
        from .images import read_rgb

        rgb = read_rgb(request.image_bytes)
    written = write_prompt_outputs(request, response, rgb, Path(args.out), args.format)
    t = response.timings
    for i, result in enumerate(response.results):
        scores = ", ".join(f"{m.score:.3f}" for m in result.masks)
        print(f"prompt set {i}: {len(result.masks)} masks, scores [{scores}], best {result.best_index}")
    print(f"image_id {response.image_id} ({'cached' if response.cached else 'encoded now'}) in {t.total_seconds:.2f} s "
          f"[image {t.image_seconds:.2f}, encoder {t.encoder_seconds:.2f}, decoder {t.decoder_seconds:.3f}, "
          f"post {t.postprocess_seconds:.3f}, output {t.output_seconds:.3f}] by {response.model.name} "
          f"({response.model.weights_origin} weights)")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
