"""What a request may ask of this server, checked once for every protocol before anything is stored or queued
(`JobService.submit` calls `admit`): parameters the generator cannot run, and the server's limits on work and
image size, each refused with a message that names the field and the number."""

from __future__ import annotations

from dataclasses import dataclass

from .amg.grids import layer_points_per_side
from .amg.params import GeneratorParams
from .domain import SegmentRequest
from .errors import InvalidInput


@dataclass(frozen=True)
class AdmissionLimits:
    """Checked at submission, whatever the protocol."""


def admit(request: SegmentRequest, limits: AdmissionLimits) -> None:
    """Raise the domain error that refuses `request`, if any; nothing is stored before this passed."""
    _check_grids(request.params)


def _check_grids(p: GeneratorParams) -> None:
    if p.point_grids is not None:
        if len(p.point_grids) < p.crop_n_layers + 1:
            raise InvalidInput(f"point_grids has {len(p.point_grids)} grid(s); crop_n_layers {p.crop_n_layers} "
                               f"needs one per layer ({p.crop_n_layers + 1})")
        return
    assert p.points_per_side is not None
    per_side = layer_points_per_side(p.points_per_side, p.crop_n_layers, p.crop_n_points_downscale_factor)
    for layer, n in enumerate(per_side):
        if n < 1:
            raise InvalidInput(
                f"crop layer {layer} would have no points: points_per_side {p.points_per_side} / "
                f"crop_n_points_downscale_factor {p.crop_n_points_downscale_factor}^{layer} < 1; raise "
                f"points_per_side or lower crop_n_layers or crop_n_points_downscale_factor")
