"""What a request may ask of this server, checked once for every protocol before anything is stored or queued
(`JobService.submit` calls `admit`, and `admit_webhook` for a request with a webhook): parameters the generator
cannot run, the server's limits on work and image size, and webhook addresses, each refused with a message that
names the field (and the number)."""

from __future__ import annotations

import asyncio

from . import outbound
from .amg.grids import decoder_prompts, layer_points_per_side
from .amg.params import GeneratorParams
from .domain import SegmentRequest
from .errors import InvalidInput
from .inputs import check_encoded_size
from .limits import AdmissionLimits


def admit(request: SegmentRequest, limits: AdmissionLimits) -> None:
    """Raise the domain error that refuses `request`, if any; nothing is stored before this passed."""
    check_encoded_size(request.image_kind, request.image_value, limits.max_image_bytes)
    _check_grids(request.params)
    _check_work(request.params, limits.max_decoder_prompts)


async def admit_webhook(url: str, limits: AdmissionLimits) -> None:
    """InvalidInput (field webhook_url) when image_url's address rules refuse `url` or its host cannot be looked
    up; the lookup runs off the event loop. The call itself checks (and pins) the address again."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, outbound.check_destination, url, limits.outbound,
                                                         "webhook_url")
    except outbound.OutboundError as e:
        raise InvalidInput(str(e), field="webhook_url") from None


def _check_work(p: GeneratorParams, cap: int) -> None:
    prompts = decoder_prompts(p)
    if prompts > cap:
        raise InvalidInput(
            f"the request asks for {prompts:,} decoder prompts, over this server's limit of {cap:,} per request "
            f"(points per side² × crops over {p.crop_n_layers + 1} layer(s)"
            + (", × (1 + candidates) with use_m2m" if p.use_m2m else "")
            + "); lower points_per_side or crop_n_layers" + (", or drop use_m2m" if p.use_m2m else ""))


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
