"""Benchmark (a script, not a test): what an annotation tool feels, end to end over gRPC on loopback.

The first call sends the image (decode, encoder, decoder, pictures); then `--clicks` clicks at random points
(a fixed seed) on its image_id, each only the decoder and the pictures. Prints the first call's cost, p50 /
p90 / p99 / mean of the clicks, the server's own stage medians, and the machine's load around the run.

    python tests/bench_prompts.py IMAGE --engines engines/sam2.1_hiera_tiny   # starts `sam2serve serve`
    python tests/bench_prompts.py IMAGE --server 127.0.0.1:50051              # a running server
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np

from sam2serve.v1 import sam2serve_pb2 as pb
from sam2serve.v1 import sam2serve_pb2_grpc as pb_grpc


@contextmanager
def served(engines: str, threads: int) -> Iterator[str]:
    """`sam2serve serve` on a free loopback port, stopped (SIGTERM, then waited for) afterwards."""
    command = [sys.executable, "-m", "sam2serve.cli", "serve", "--engines", engines, "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", "-1", "--threads", str(threads), "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            found = re.search(r"listening on (\S+):(\d+)", line)
            if found:
                yield f"127.0.0.1:{found.group(2)}"
                break
        else:
            raise SystemExit(f"the server exited with code {process.wait()} before listening")
    finally:
        process.terminate()
        process.wait(60)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def run(address: str, image: Path, clicks: int, multimask: bool, images: bool, rle: bool) -> None:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20),
                                                      ("grpc.max_send_message_length", 256 << 20)])
    grpc.channel_ready_future(channel).result(timeout=600)
    stub = pb_grpc.PromptSegmentServiceStub(channel)
    outputs = {"multimask_output": multimask, "return_mask_images": images, "return_rle": rle}
    data = image.read_bytes()
    start = time.perf_counter()
    first = stub.Segment(pb.SegmentRequest(image_bytes=data, points=[pb.PointPrompt(x=1, y=1)], **outputs),
                         timeout=600)
    first_s = time.perf_counter() - start
    t = first.timings
    print(f"image {image.name} {first.width}x{first.height}, {first.model.name} ({first.model.weights_origin} "
          f"weights); {'multimask' if multimask else 'single mask'}, pictures {images}, RLE {rle}")
    print(f"first call (image sent): {first_s * 1000:.0f} ms end to end; server: image {t.image_seconds * 1000:.0f}"
          f", encoder {t.encoder_seconds * 1000:.0f}, decoder {t.decoder_seconds * 1000:.0f}, post "
          f"{t.postprocess_seconds * 1000:.0f}, output {t.output_seconds * 1000:.0f} ms")
    rng = np.random.default_rng(0)
    xs, ys = rng.uniform(0, first.width, clicks), rng.uniform(0, first.height, clicks)
    stub.Segment(pb.SegmentRequest(image_id=first.image_id, points=[pb.PointPrompt(x=1, y=1)], **outputs),
                 timeout=60)  # one warm click: first-use allocations are not what a user feels
    totals: list[float] = []
    stages: dict[str, list[float]] = {"decoder": [], "postprocess": [], "output": []}
    sizes = []
    for x, y in zip(xs, ys, strict=True):
        request = pb.SegmentRequest(image_id=first.image_id, points=[pb.PointPrompt(x=float(x), y=float(y))],
                                    **outputs)
        start = time.perf_counter()
        response = stub.Segment(request, timeout=60)
        totals.append(time.perf_counter() - start)
        stages["decoder"].append(response.timings.decoder_seconds)
        stages["postprocess"].append(response.timings.postprocess_seconds)
        stages["output"].append(response.timings.output_seconds)
        sizes.append(response.ByteSize())
    print(f"{clicks} cached clicks end to end: p50 {percentile(totals, 50):.1f} ms, p90 {percentile(totals, 90):.1f}"
          f" ms, p99 {percentile(totals, 99):.1f} ms, mean {np.mean(totals) * 1000:.1f} ms; response "
          f"{np.median(sizes) / 1024:.0f} KiB")
    print("server medians: " + ", ".join(f"{k} {percentile(v, 50):.1f} ms" for k, v in stages.items()))
    channel.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--engines", help="engine directory: start `sam2serve serve` on loopback for the run")
    where.add_argument("--server", help="address of a running server")
    parser.add_argument("--clicks", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads of the started server")
    parser.add_argument("--single-mask", action="store_true")
    parser.add_argument("--no-images", action="store_true", help="no mask pictures (with --rle: RLE only)")
    parser.add_argument("--rle", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} before")
    if args.server:
        run(args.server, args.image, args.clicks, not args.single_mask, not args.no_images, args.rle)
    else:
        with served(args.engines, args.threads) as address:
            run(address, args.image, args.clicks, not args.single_mask, not args.no_images, args.rle)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} after")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
