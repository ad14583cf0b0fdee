"""Official-format checkpoints: round trip to identical engines, and clear errors for the wrong file."""

from __future__ import annotations

import pytest
import torch

from conftest import SEED, TINY, needs_export_tools
from sam2serve.engines.manifest import read_manifest

pytestmark = needs_export_tools


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from sam2serve_export.checkpoint import build_untrained_model, save_official_checkpoint
    from sam2serve_export.models import get_model_spec

    path = tmp_path_factory.mktemp("ckpt") / f"{TINY}.pt"
    save_official_checkpoint(build_untrained_model(get_model_spec(TINY), SEED), path)
    return path


def test_checkpoint_round_trip_gives_identical_engines(tiny_checkpoint, tiny_engine_dir, tmp_path):
    from sam2serve.engines.manifest import sha256_file
    from sam2serve_export.build import build_engines
    from sam2serve_export.models import get_model_spec
    from sam2serve_export.weights import WeightsChoice

    assert set(torch.load(tiny_checkpoint, weights_only=True)) == {"model"}
    manifest, _ = build_engines(get_model_spec(TINY), tmp_path / "from-ckpt",
                                WeightsChoice(checkpoint=tiny_checkpoint), progress=False)
    untrained = read_manifest(tiny_engine_dir)
    for role in ("encoder", "decoder"):
        assert manifest.engines[role].sha256 == untrained.engines[role].sha256, role
    assert manifest.weights.origin == "checkpoint" and manifest.weights.trained
    assert manifest.weights.sha256 == sha256_file(tiny_checkpoint)


def test_wrong_model_for_checkpoint_is_explained(tiny_checkpoint):
    from sam2serve_export.checkpoint import build_model, load_official_checkpoint
    from sam2serve_export.errors import CheckpointError
    from sam2serve_export.models import get_model_spec

    small = get_model_spec("sam2.1_hiera_small")
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(build_model(small), small, tiny_checkpoint)
    message = str(info.value)
    assert "does not fit model sam2.1_hiera_small" in message
    assert "12 Hiera blocks" in message and "16 Hiera blocks" in message and "--model" in message


@pytest.mark.parametrize(
    ("payload", "expected"),
    [({"state_dict": {}}, "not in the official SAM 2 format"), ([1, 2], "not in the official SAM 2 format")],
)
def test_non_official_files_are_rejected(tmp_path, payload, expected):
    from sam2serve_export.checkpoint import read_state_dict
    from sam2serve_export.errors import CheckpointError

    path = tmp_path / "x.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=expected):
        read_state_dict(path)


def test_garbage_and_missing_files_are_rejected(tmp_path):
    from sam2serve_export.checkpoint import read_state_dict
    from sam2serve_export.errors import CheckpointError

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_state_dict(garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pt")


def test_unknown_model_name_lists_the_choices():
    from sam2serve_export.errors import UnknownModelError
    from sam2serve_export.models import get_model_spec

    with pytest.raises(UnknownModelError, match=r"sam2\.1_hiera_large"):
        get_model_spec("sam3_huge")


def test_every_official_config_exists_in_metas_package():
    import sam2  # noqa: F401  (initialises hydra's config module)
    from hydra import compose

    from sam2serve_export.models import MODELS

    for spec in MODELS.values():
        cfg = compose(config_name=spec.config)
        assert cfg.model.image_size == 1024, spec.name
        assert len(spec.sha256) == 64 and spec.url().endswith(f"/{spec.name}.pt")


def test_export_refuses_to_replace_a_directory_that_holds_other_files(tmp_path):
    """`--out engines` (the parent of every model's directory) would have been replaced whole, README and other
    models deleted: refused before any work, nothing touched."""
    from sam2serve_export.build import build_engines
    from sam2serve_export.errors import ExportError
    from sam2serve_export.models import get_model_spec
    from sam2serve_export.weights import WeightsChoice

    parent = tmp_path / "engines"
    (parent / "sam2.1_hiera_small").mkdir(parents=True)
    (parent / "README.md").write_text("ours")
    with pytest.raises(ExportError, match=r"holds no manifest\.json"):
        build_engines(get_model_spec(TINY), parent, WeightsChoice(untrained_seed=SEED), progress=False)
    assert (parent / "README.md").read_text() == "ours" and (parent / "sam2.1_hiera_small").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # no staging directory left behind
