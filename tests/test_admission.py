"""What JobService refuses before anything is stored, for every protocol: parameters the generator cannot
run, the work cap, the image cap, ids this server never issued."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from jobfakes import outcome, request, service
from sam2serve.errors import ImageFetchError, ImageTooLarge, InvalidInput, JobNotFound, Overloaded
from sam2serve.jobs.memory import MemoryJobStore
from sam2serve.limits import AdmissionLimits


def submitted(req, limits: AdmissionLimits | None = None):
    """Submit `req` to a fresh in-process JobService; (the error raised or None, jobs stored)."""

    async def main():
        store = MemoryJobStore()
        jobs = service(store, lambda r, c: outcome())
        if limits is not None:
            jobs.limits = limits
        try:
            await jobs.submit(req)
        except Exception as e:
            return e, len(store._jobs)
        return None, len(store._jobs)

    return asyncio.run(main())


def with_params(**params):
    base = request()
    return replace(base, params=replace(base.params, **params))


@pytest.mark.parametrize(("points", "layers", "scale", "layer"), [(1, 1, 2, 1), (3, 2, 2, 2), (15, 3, 4, 2)])
def test_a_crop_layer_without_points_is_refused_not_divided_by_zero(points, layers, scale, layer):
    error, stored = submitted(with_params(points_per_side=points, crop_n_layers=layers,
                                          crop_n_points_downscale_factor=scale))
    assert isinstance(error, InvalidInput) and stored == 0
    assert f"crop layer {layer} would have no points" in str(error) and f"points_per_side {points}" in str(error)


def test_work_over_the_cap_is_refused_at_submit_with_the_number():
    """At the parameter maxima (64 points, 3 crop layers, use_m2m) one request held a CPU worker ~20 hours."""
    error, stored = submitted(with_params(points_per_side=64, crop_n_layers=3, use_m2m=True))
    assert isinstance(error, InvalidInput) and stored == 0
    assert "asks for 1,392,640 decoder prompts, over this server's limit of 20,480" in str(error)
    assert "use_m2m" in str(error)
    assert submitted(with_params(points_per_side=64, crop_n_layers=1)) == (None, 1)  # 64² × 5 = the cap
    small = AdmissionLimits(max_decoder_prompts=100)
    assert submitted(with_params(points_per_side=10), small) == (None, 1)
    error, stored = submitted(with_params(points_per_side=11), small)
    assert "asks for 121 decoder prompts, over this server's limit of 100" in str(error) and stored == 0


def test_a_grid_that_keeps_a_point_per_layer_is_accepted():
    assert submitted(with_params(points_per_side=4, crop_n_layers=2, crop_n_points_downscale_factor=2)) == (None, 1)


class _NoLookups(MemoryJobStore):
    """A store that fails the test if it is asked about an id."""

    async def snapshot(self, job_id):
        raise AssertionError(f"looked up {job_id[:40]!r}")

    result = cancel = snapshot

    def changes(self, job_id):
        raise AssertionError(f"watched {job_id[:40]!r}")


def test_ids_this_server_never_issues_are_not_found_without_a_lookup_and_never_echoed_in_full():
    async def main():
        jobs = service(_NoLookups(), lambda r, c: outcome())
        for job_id in ("x" * 100_000, "nope", "A" * 32, "0" * 31 + "g", ""):
            for call in (jobs.status, jobs.result, jobs.cancel):
                with pytest.raises(JobNotFound) as info:
                    await call(job_id)
                assert len(str(info.value)) < 200 and "32 hexadecimal characters" in str(info.value)
            with pytest.raises(JobNotFound):
                jobs.watch(job_id)
        with pytest.raises(JobNotFound, match=r"no request with id 'xxxx.*… \(100000 characters\)"):
            await jobs.status("x" * 100_000)

    asyncio.run(main())


def test_an_image_over_the_cap_is_refused_before_it_is_queued():
    """16 × 60 MiB image_bytes were accepted and held by the queue (+765 MiB RSS) until each job failed."""
    cap = AdmissionLimits(max_image_bytes=1000)
    for kind, value, message in (
            ("bytes", b"x" * 1001, "image_bytes is 1001 bytes, over the limit of 1000 bytes"),
            ("data_uri", "data:image/png;base64," + "A" * 1340, "image_data_uri holds about 1005 bytes"),
            ("url", "https://example.com/" + "a" * 9000, "image_url is longer than 8192 characters")):
        error, stored = submitted(replace(request(), image_kind=kind, image_value=value), cap)
        assert isinstance(error, ImageTooLarge | ImageFetchError) and message in str(error) and stored == 0
    for kind, value in (("bytes", b"x" * 1000), ("data_uri", "data:image/png;base64," + "A" * 1332)):
        assert submitted(replace(request(), image_kind=kind, image_value=value), cap) == (None, 1)


def test_status_streams_are_bounded():
    async def main():
        jobs = service(MemoryJobStore(), lambda r, c: outcome())
        jobs.max_streams = 2
        job = await jobs.submit(request())
        open_ = [jobs.watch(job.id) for _ in range(2)]
        for stream in open_:
            assert (await anext(stream)).id == job.id
        third = jobs.watch(job.id)
        with pytest.raises(Overloaded, match="2 status streams are open on this server"):
            await anext(third)
        await open_[0].aclose()
        fourth = jobs.watch(job.id)
        assert (await anext(fourth)).id == job.id and jobs.streams == 2
        for stream in (open_[1], fourth):
            await stream.aclose()
        assert jobs.streams == 0

    asyncio.run(main())
