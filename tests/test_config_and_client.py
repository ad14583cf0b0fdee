"""Configuration precedence, and the `sam2serve segment` client writing what people look at."""

from __future__ import annotations

import argparse
import json

import cv2
import pytest

from conftest import needs_export_tools
from grpc_harness import ServerThread, png_bytes
from sam2serve.client import segment_command
from sam2serve.config import ServerConfig, add_config_flags, config_from


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return parser.parse_args(argv)


def test_flags_beat_environment_beats_defaults():
    env = {"SAM2SERVE_PORT": "6000", "SAM2SERVE_WORKERS": "3", "SAM2SERVE_ALLOW_PRIVATE_URLS": "true"}
    config = config_from(_parse(["--port", "7000"]), env)
    assert (config.port, config.workers, config.allow_private_urls) == (7000, 3, True)
    assert config.queue_size == ServerConfig().queue_size
    assert "api_key=***" in config_from(_parse(["--api-key", "hush"]), {}).describe()


def test_bad_numbers_are_reported_by_name():
    with pytest.raises(SystemExit, match="port must be a int"):
        config_from(_parse([]), {"SAM2SERVE_PORT": "eighty"})


@needs_export_tools
def test_segment_writes_masks_metadata_and_an_overlay(tiny_engine, tmp_path, capsys):
    server = ServerThread(ServerConfig(), tiny_engine)
    try:
        image = tmp_path / "scene.png"
        image.write_bytes(png_bytes())
        args = argparse.Namespace(image=str(image), server=server.address, out=str(tmp_path / "out"), queue=True,
                                  api_key="", points_per_side=4, format="png", max_masks=None, timeout=120)
        assert segment_command(args) == 0
    finally:
        server.stop()
    out = tmp_path / "out"
    overlay = cv2.imread(str(out / "overlay.png"))
    assert overlay.shape == (240, 320, 3) and cv2.imread(str(out / "combined_mask.png")).shape == (240, 320, 3)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model"]["untrained"] is True and "data" not in meta["combined_mask"]
    assert len(list((out / "masks").glob("*.png"))) == len(meta.get("masks", []))
    err = capsys.readouterr().err
    assert "UNTRAINED" in err
    # stderr is not a terminal here: the queue's progress is logged a line per change, never redrawn
    progress = [line for line in err.splitlines() if ": in_progress" in line or ": completed" in line]
    assert progress and progress[-1].endswith("completed 100%") and "\r" not in err
    assert len(progress) == len(set(progress)) <= 12  # in_progress 0…100 % in tens, then completed
