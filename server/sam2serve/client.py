"""`sam2serve segment`: call a running server and write what it returns, plus an overlay to look at."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from .v1 import sam2serve_pb2 as pb
from .v1 import sam2serve_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
Metadata = tuple[tuple[str, str], ...]
Request = TypeVar("Request")
Response = TypeVar("Response")
OUTPUT_FORMATS = {"png": pb.OUTPUT_FORMAT_PNG, "jpeg": pb.OUTPUT_FORMAT_JPEG, "webp": pb.OUTPUT_FORMAT_WEBP}


def set_image(request: pb.AutoSegmentRequest | pb.SegmentRequest, image: str) -> None:
    """The request's image from a command-line argument: a URL the server fetches, or a file's bytes."""
    if image.startswith(("http://", "https://")):
        request.image_url = image
    else:
        request.image_bytes = Path(image).read_bytes()


def build_request(args: argparse.Namespace) -> pb.AutoSegmentRequest:
    request = pb.AutoSegmentRequest(return_overlay=True, output_format=OUTPUT_FORMATS[args.format])
    set_image(request, args.image)
    if args.points_per_side is not None:
        request.points_per_side = args.points_per_side
    if args.max_masks is not None:
        request.max_masks = args.max_masks
    return request


def write_outputs(response: pb.AutoSegmentResponse, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image in [response.combined_mask, *([response.overlay] if response.HasField("overlay") else [])]:
        name = image.file_name if image is response.combined_mask else f"overlay.{image.file_name.rsplit('.', 1)[-1]}"
        (out / name).write_bytes(image.data)
        written.append(out / name)
    masks_dir = out / "masks"
    masks_dir.mkdir(exist_ok=True)
    for image in response.individual_masks:
        (masks_dir / image.file_name).write_bytes(image.data)
    from google.protobuf.json_format import MessageToDict

    meta = MessageToDict(response, preserving_proto_field_name=True)
    for key in ("combined_mask", "overlay"):
        meta.get(key, {}).pop("data", None)
    for image in meta.get("individual_masks", []):
        image.pop("data", None)
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))
    written.append(out / "metadata.json")
    return written


def auth_metadata(api_key: str | None) -> Metadata:
    key = api_key if api_key is not None else os.environ.get("SAM2SERVE_API_KEY", "")
    return (("authorization", f"Key {key}"),) if key else ()


def open_channel(server: str) -> grpc.Channel:
    return grpc.insecure_channel(server, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])


def warn_if_untrained(channel: grpc.Channel, metadata: Metadata) -> None:
    info = pb_grpc.AutoSegmentServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30, metadata=metadata)
    if info.warning:
        print(f"WARNING from server: {info.warning}", file=sys.stderr)


def call_server(args: argparse.Namespace, build: Callable[[argparse.Namespace], Request],
                call: Callable[[grpc.Channel, Request, Metadata], Response]) -> tuple[Request, Response] | int:
    """Build the request from the command line and make the call: (request, response), or the exit code after
    saying what went wrong (2: the image file cannot be read, 1: the server refused)."""
    metadata = auth_metadata(args.api_key)
    try:
        request = build(args)
    except OSError as e:
        print(f"error: cannot read {args.image}: {e.strerror}", file=sys.stderr)
        return 2
    with open_channel(args.server) as channel:
        try:
            warn_if_untrained(channel, metadata)
            return request, call(channel, request, metadata)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1


def segment_command(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, request: pb.AutoSegmentRequest, metadata: Metadata) -> pb.AutoSegmentResponse:
        stub = pb_grpc.AutoSegmentServiceStub(channel)
        if args.queue:
            return _via_queue(stub, request, metadata, args.timeout)
        return stub.AutoSegment(request, timeout=args.timeout, metadata=metadata)

    done = call_server(args, build_request, call)
    if isinstance(done, int):
        return done
    _, response = done
    written = write_outputs(response, Path(args.out))
    t = response.timings
    print(f"{len(response.masks)} masks ({response.total_masks} found) in {t.total_seconds:.1f} s "
          f"[encoder {t.encoder_seconds:.1f}, decoder {t.decoder_seconds:.1f}, post {t.postprocess_seconds:.1f}, "
          f"output {t.output_seconds:.1f}] by {response.model.name} ({response.model.weights_origin} weights)")
    print("wrote " + ", ".join(str(p) for p in written) + f" and {len(response.individual_masks)} masks in "
          f"{Path(args.out) / 'masks'}")
    return 0


def _via_queue(stub: pb_grpc.AutoSegmentServiceStub, request: pb.AutoSegmentRequest,
               metadata: tuple[tuple[str, str], ...], timeout: float) -> pb.AutoSegmentResponse:
    from tqdm import tqdm

    submitted = stub.Submit(request, timeout=60, metadata=metadata)
    interactive = sys.stderr.isatty()  # a redrawn bar in a log file is thousands of lines; log changes instead
    bar = tqdm(total=100, unit="%", desc="queued", file=sys.stderr, disable=not interactive)
    final, last_line = None, ""
    for status in stub.WatchStatus(pb.StatusRequest(request_id=submitted.request_id), timeout=timeout,
                                   metadata=metadata):
        state = pb.RequestStatus.State.Name(status.state)
        where = f"{state.lower()}" + (f" #{status.queue_position}" if state == "IN_QUEUE" else "")
        bar.set_description(where)
        bar.n = round(status.progress * 100)
        bar.refresh()
        line = f"{submitted.request_id}: {where} {round(status.progress * 10) * 10}%"
        if not interactive and line != last_line:
            print(line, file=sys.stderr, flush=True)
            last_line = line
        final = status
    bar.close()
    if final is not None and final.state != pb.RequestStatus.COMPLETED:
        print(f"request ended {pb.RequestStatus.State.Name(final.state)}: {final.error}", file=sys.stderr)
    return stub.GetResult(pb.ResultRequest(request_id=submitted.request_id), timeout=60, metadata=metadata)
