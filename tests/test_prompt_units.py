"""The prompt data plane's parts without engines: the byte-budget LRU, prompt checks, decoder inputs, image ids,
and the bounded worker pool."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import cv2
import numpy as np
import pytest

from sam2serve.engines.base import EngineInfo
from sam2serve.errors import ImageFetchError, InvalidInput, QueueFull, ShuttingDown
from sam2serve.inputs import InputLimits, load_image
from sam2serve.outputs import encode_image
from sam2serve.prompts import (
    BoxPrompt,
    ByteBudgetLRU,
    ImageSource,
    PointPrompt,
    PromptLimits,
    PromptRequest,
    PromptWorkers,
    image_id_of,
)
from sam2serve.prompts.prepare import decoder_prompts, mask_input
from sam2serve.prompts.validate import check_prompts, check_within_image


class Blob:
    def __init__(self, nbytes: int, name: str = "") -> None:
        self.nbytes, self.name = nbytes, name


class Recorder:
    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()
        self.sizes: dict[str, tuple[int, int]] = {}

    def hit(self, kind: str) -> None:
        self.events["hit", kind] += 1

    def miss(self, kind: str) -> None:
        self.events["miss", kind] += 1

    def evicted(self, kind: str) -> None:
        self.events["evicted", kind] += 1

    def size(self, kind: str, entries: int, nbytes: int) -> None:
        self.sizes[kind] = (entries, nbytes)


# -- cache -------------------------------------------------------------------------------------------------
def test_lru_evicts_least_recently_used_within_the_byte_budget():
    seen = Recorder()
    cache = ByteBudgetLRU(100, seen)
    for key in "abc":
        assert cache.put(key, "image", Blob(30, key))
    assert cache.get("a", "image").name == "a"  # a is now the most recent; b is the oldest
    assert cache.put("d", "mask", Blob(30, "d"))  # 120 > 100: b goes
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.nbytes == 90 and len(cache) == 3
    assert cache.get("b", "image") is None
    assert seen.events == {("hit", "image"): 1, ("miss", "image"): 1, ("evicted", "image"): 1}
    assert seen.sizes == {"image": (2, 60), "mask": (1, 30)}
    assert cache.put("big", "image", Blob(60))  # two more go, oldest first (c, then a)
    assert "c" not in cache and "a" not in cache and "d" in cache and cache.nbytes == 90


def test_lru_refuses_what_exceeds_the_whole_budget_and_replaces_keys_in_place():
    cache = ByteBudgetLRU(50)
    cache.put("a", "image", Blob(40))
    assert not cache.put("huge", "image", Blob(51)) and "huge" not in cache and "a" in cache
    cache.put("a", "image", Blob(10))
    assert cache.nbytes == 10 and len(cache) == 1
    with pytest.raises(ValueError, match="budget"):
        ByteBudgetLRU(-1)


def test_concurrent_misses_on_one_key_compute_once():
    seen = Recorder()
    cache = ByteBudgetLRU(1000, seen)
    calls = []
    start, release = threading.Barrier(8), threading.Event()

    def compute() -> Blob:
        calls.append(1)
        release.wait(30)
        return Blob(10, "value")

    results = []

    def worker() -> None:
        start.wait(30)
        results.append(cache.get_or_compute("k", "image", compute))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(results) == 8
    assert {value.name for value, _ in results} == {"value"}
    assert sorted(cached for _, cached in results) == [False] + [True] * 7
    assert seen.events == {("miss", "image"): 1, ("hit", "image"): 7}


def test_a_failed_computation_reaches_its_waiters_and_is_not_cached():
    cache = ByteBudgetLRU(1000)

    def fail() -> Blob:
        raise InvalidInput("broken image")

    with pytest.raises(InvalidInput, match="broken image"):
        cache.get_or_compute("k", "image", fail)
    assert "k" not in cache
    value, cached = cache.get_or_compute("k", "image", lambda: Blob(1, "ok"))
    assert value.name == "ok" and not cached


# -- prompt checks -----------------------------------------------------------------------------------------
def _request(points=(), boxes=()) -> PromptRequest:
    return PromptRequest(ImageSource("image_id", "0" * 64), tuple(points), tuple(boxes))


@pytest.mark.parametrize(("points", "boxes", "message"), [
    ((), (), "no prompt"),
    ([PointPrompt(1, 1)] * 4, (), "4 points, over this server's limit of 3"),
    ((), [BoxPrompt(0, 0, 5, 5)] * 3, "3 boxes, over this server's limit of 2"),
    ([PointPrompt(float("nan"), 3)], (), r"points\[0\] = \(nan, 3\): coordinates must be finite"),
    ([PointPrompt(1, 1), PointPrompt(2, float("inf"))], (), r"points\[1\].*finite"),
    ([PointPrompt(1, 1, 2)], (), r"points\[0\].label must be 1 \(foreground\) or 0 \(background\), got 2"),
    ((), [BoxPrompt(10, 10, 5, 20)], r"boxes\[0\] = \(10, 10, 5, 20\) is inverted or empty"),
    ((), [BoxPrompt(0, 0, 5, 5), BoxPrompt(10, 20, 30, 20)], r"boxes\[1\] .* is inverted or empty"),
    ((), [BoxPrompt(0, float("nan"), 5, 5)], r"boxes\[0\].*finite"),
])
def test_bad_prompts_are_refused_with_a_message_naming_them(points, boxes, message):
    with pytest.raises(InvalidInput, match=message):
        check_prompts(_request(points, boxes), PromptLimits(max_points=3, max_boxes=2))


def test_prompts_must_lie_on_the_image_edges_included():
    check_within_image(_request([PointPrompt(0, 0), PointPrompt(640, 480)], [BoxPrompt(0, 0, 640, 480)]), 640, 480)
    with pytest.raises(InvalidInput, match=r"points\[1\] = \(641, 3\) lies outside the 640x480 image"):
        check_within_image(_request([PointPrompt(3, 3), PointPrompt(641, 3)]), 640, 480)
    with pytest.raises(InvalidInput, match=r"points\[0\] = \(-0.5, 3\) lies outside"):
        check_within_image(_request([PointPrompt(-0.5, 3)]), 640, 480)
    with pytest.raises(InvalidInput, match=r"boxes\[0\] = \(10, 10, 100, 481\) reaches outside the 640x480"):
        check_within_image(_request(boxes=[BoxPrompt(10, 10, 100, 481)]), 640, 480)


# -- decoder inputs ----------------------------------------------------------------------------------------
def test_box_corners_go_first_as_labels_2_and_3_and_every_box_gets_every_point():
    points = (PointPrompt(320, 240, 1), PointPrompt(64, 48, 0))
    boxes = (BoxPrompt(0, 0, 320, 240), BoxPrompt(160, 120, 640, 480))
    coords, labels = decoder_prompts(points, boxes, (480, 640), 1024)
    assert coords.shape == (2, 4, 2) and labels.shape == (2, 4) and coords.dtype == labels.dtype == np.float32
    np.testing.assert_array_equal(labels, [[2, 3, 1, 0], [2, 3, 1, 0]])
    np.testing.assert_allclose(coords[0], [[0, 0], [512, 512], [512, 512], [102.4, 102.4]], rtol=1e-6)
    np.testing.assert_allclose(coords[1, :2], [[256, 256], [1024, 1024]], rtol=1e-6)
    np.testing.assert_array_equal(coords[0, 2:], coords[1, 2:])


def test_points_alone_are_one_prompt_set_and_boxes_alone_have_only_their_corners():
    coords, labels = decoder_prompts((PointPrompt(10, 20, 1),), (), (100, 200), 1024)
    assert coords.shape == (1, 1, 2) and labels.tolist() == [[1.0]]
    np.testing.assert_allclose(coords[0, 0], [51.2, 204.8], rtol=1e-6)
    coords, labels = decoder_prompts((), (BoxPrompt(1, 2, 3, 4),), (100, 200), 1024)
    assert coords.shape == (1, 2, 2) and labels.tolist() == [[2.0, 3.0]]


def test_mask_input_is_clamped_like_the_predictors_logits_and_repeated_per_prompt_set():
    logits = np.linspace(-100, 100, 256 * 256, dtype=np.float32).reshape(256, 256)
    fed = mask_input(logits, 3)
    assert fed.shape == (3, 1, 256, 256) and fed.min() == -32.0 and fed.max() == 32.0
    np.testing.assert_array_equal(fed[2, 0], np.clip(logits, -32, 32))


# -- image ids ---------------------------------------------------------------------------------------------
def test_image_id_is_of_the_decoded_pixels_and_the_model():
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    limits = InputLimits()
    as_png = load_image("bytes", encode_image(rgb, "png", "a").data, limits).rgb
    as_webp = load_image("bytes", encode_image(rgb, "webp", "a").data, limits).rgb  # lossless
    assert image_id_of(as_png, "m") == image_id_of(as_webp, "m") == image_id_of(rgb, "m")
    assert len(image_id_of(rgb, "m")) == 64
    assert image_id_of(rgb, "m") != image_id_of(rgb, "other model")
    same_bytes_other_shape = np.ascontiguousarray(rgb).reshape(64, 48, 3)
    assert image_id_of(same_bytes_other_shape, "m") != image_id_of(rgb, "m")
    changed = rgb.copy()
    changed[0, 0, 0] ^= 1
    assert image_id_of(changed, "m") != image_id_of(rgb, "m")


def test_webp_masks_are_lossless():
    mask = np.zeros((40, 60), bool)
    mask[5:30, 10:50] = True
    picture = encode_image(mask, "webp", "m")
    assert picture.content_type == "image/webp" and picture.file_name == "m.webp"
    decoded = cv2.imdecode(np.frombuffer(picture.data, np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(decoded, mask.astype(np.uint8) * 255)


# -- workers -----------------------------------------------------------------------------------------------
class BlockingSegmenter:
    """Stands in for PromptSegmenter: each call waits until the test lets it go."""

    limits, input_limits = PromptLimits(), InputLimits()

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.release = threading.Event()
        self.threads: set[str] = set()

    def segment(self, request: object) -> str:
        self.threads.add(threading.current_thread().name)
        self.started.release()
        self.release.wait(30)
        return "done"

    embed = segment


def test_workers_run_off_the_loop_bound_the_calls_and_refuse_while_draining():
    async def scenario() -> None:
        fake = BlockingSegmenter()
        workers = PromptWorkers(fake, workers=1, max_waiting=1)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(workers.segment(_request([PointPrompt(1, 1)])))
        await loop.run_in_executor(None, fake.started.acquire)  # the first call is running
        second = asyncio.create_task(workers.embed(ImageSource("bytes", b"x")))  # waits for the only worker
        await asyncio.sleep(0)  # one turn of the loop: the task runs to its first await (not a timed wait)
        assert workers.calls == 2
        with pytest.raises(QueueFull, match="2 prompt calls are running or waiting"):
            await workers.segment(_request([PointPrompt(1, 1)]))
        second.cancel()  # a caller that leaves before its turn frees its place at once
        with pytest.raises(asyncio.CancelledError):
            await second
        assert workers.calls == 1
        fake.release.set()
        assert await first == "done"
        assert fake.threads and not any(name == threading.current_thread().name for name in fake.threads)
        workers.accepting = False
        with pytest.raises(ShuttingDown):
            await workers.segment(_request([PointPrompt(1, 1)]))
        workers.close()

    asyncio.run(scenario())



# -- fal's prompted endpoint -------------------------------------------------------------------------------
def test_fal_input_becomes_one_single_mask_prediction():
    from sam2serve.transport.fal.image_schema import to_prompt_request

    request, options = to_prompt_request({
        "image_url": "https://example.com/truck.jpg", "prompts": [{"x": 500, "y": 375, "label": 1}, {"x": 1, "y": 2}],
        "box_prompts": [{"x_min": 425, "y_min": 600, "x_max": 700, "y_max": 875}], "apply_mask": True,
        "output_format": "webp"})
    assert request.image == ImageSource("url", "https://example.com/truck.jpg") and not request.multimask
    assert request.points == (PointPrompt(500, 375, 1), PointPrompt(1, 2, 1))  # fal's label defaults to 1
    assert request.boxes == (BoxPrompt(425, 600, 700, 875),) and not request.outputs.images
    assert (options.apply_mask, options.sync_mode, options.output_format) == (True, False, "webp")
    data_uri, _ = to_prompt_request({"image_url": "data:image/png;base64,AAAA", "prompts": [{"x": 1, "y": 1}]})
    assert data_uri.image.kind == "data_uri"


@pytest.mark.parametrize(("payload", "message"), [
    ({}, "image_url is required"),
    ({"image_url": "https://e.com/a.png", "prompts": {"x": 1}}, "prompts must be a list"),
    ({"image_url": "https://e.com/a.png", "prompts": [{"x": "1", "y": 2}]}, r"prompts\[0\].x must be a number"),
    ({"image_url": "https://e.com/a.png", "prompts": [{"x": 1, "y": 2, "label": 3}]}, r"prompts\[0\].label"),
    ({"image_url": "https://e.com/a.png", "box_prompts": [{"x_min": 1}]}, r"box_prompts\[0\].y_min must be"),
    ({"image_url": "https://e.com/a.png", "output_format": "gif"}, "output_format must be one of png, jpeg, webp"),
    ({"image_url": "https://e.com/a.png", "apply_mask": "yes"}, "apply_mask must be true or false"),
])
def test_fal_input_errors_name_the_field(payload, message):
    from sam2serve.transport.fal.image_schema import to_prompt_request

    with pytest.raises(InvalidInput, match=message):
        to_prompt_request(payload)


def test_fals_image_is_the_union_of_best_masks_or_the_photo_with_it_applied():
    from sam2serve.prompts import EmbeddedImage, PredictedMask, PromptOutcome, PromptSetResult
    from sam2serve.transport.fal.image_schema import ImageOptions, output_image

    rgb = np.full((20, 30, 3), 200, np.uint8)
    left, right, ignored = (np.zeros((20, 30), bool) for _ in range(3))
    left[2:8, 2:8], right[10:15, 20:25], ignored[:, :] = True, True, True

    def mask(m: np.ndarray, score: float) -> PredictedMask:
        return PredictedMask(0, score, lambda: m, int(m.sum()), [], "")

    outcome = PromptOutcome(EmbeddedImage("0" * 64, 30, 20, True, rgb), [
        PromptSetResult([mask(ignored, 0.1), mask(left, 0.9)]), PromptSetResult([mask(right, 0.5)])])
    picture = output_image(outcome, ImageOptions(output_format="png"))
    decoded = cv2.imdecode(np.frombuffer(picture.data, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded > 0, left | right)
    applied = output_image(outcome, ImageOptions(apply_mask=True, output_format="webp"))
    bgra = cv2.imdecode(np.frombuffer(applied.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert bgra.shape == (20, 30, 4) and applied.content_type == "image/webp"
    np.testing.assert_array_equal(bgra[..., 3] > 0, left | right)
    assert (bgra[left][:, :3] == 200).all()
    jpeg = output_image(outcome, ImageOptions(apply_mask=True, output_format="jpeg"))
    bgr = cv2.imdecode(np.frombuffer(jpeg.data, np.uint8), cv2.IMREAD_COLOR)
    assert bgr[0, 0].max() < 30 and bgr[4, 4].min() > 170  # black outside, the photo inside


class _FactoredEngine:
    """An engine whose factored decoder keeps a context per image 3x the size of its features, as the real
    one does (≈ 45 MB beside 17 MB)."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.manifest = SimpleNamespace(model="fake", weights=SimpleNamespace(origin="untrained", sha256="", seed=0),
                                        image_size=16, pixel_mean=(0.0, 0.0, 0.0), pixel_std=(1.0, 1.0, 1.0))
        self.factored = self
        self.info = EngineInfo("fake", ("CPUExecutionProvider",), trained=False)

    def encode(self, image: np.ndarray):
        from sam2serve.engines.base import ImageFeatures

        return ImageFeatures(np.zeros((1, 4, 4, 4), np.float32), np.zeros((1, 2, 8, 8), np.float32),
                             np.zeros((1, 4, 4, 4), np.float32))  # 1 KiB in all

    def context(self, features) -> dict[str, np.ndarray]:
        return {"ca1_keys": np.zeros(512, np.float32), "dc2_bias": np.zeros(256, np.float32)}  # 3 KiB


def test_the_embedding_cache_counts_the_decoder_context_it_keeps_alive():
    """Before, an embedding counted its features only (17 MB) while the factored decoder's context of those
    features (≈ 45 MB) lived as long: a 512 MB budget held ≈ 1.9 GB."""
    from sam2serve.prompts.segmenter import PromptSegmenter

    cache: ByteBudgetLRU = ByteBudgetLRU(6 * 1024)  # room for one image with its context, not two
    segmenter = PromptSegmenter(_FactoredEngine(), cache, InputLimits())  # type: ignore[arg-type]
    pictures = [cv2.imencode(".png", np.full((8, 8, 3), v, np.uint8))[1].tobytes() for v in (10, 200)]
    for picture in pictures:
        segmenter.embed(ImageSource("image_bytes", picture))
    assert len(cache) == 1 and cache.nbytes == 4 * 1024


def test_a_hanging_image_url_waits_in_the_fetch_stage_not_on_the_prompt_worker():
    """Before, a prompt call's image_url was downloaded on its prompt worker: with one worker, a hanging
    upstream held every call behind it for the fetch timeout."""
    import socket

    from sam2serve.jobs import Worker
    from sam2serve.jobs.memory import MemoryJobStore
    from sam2serve.prompts.segmenter import PromptSegmenter

    async def main() -> None:
        hanging = socket.socket()  # accepts connections into its backlog and never answers
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(8)
        stage = Worker(MemoryJobStore(), None, workers=0, fetchers=2)  # type: ignore[arg-type]
        segmenter = PromptSegmenter(_FactoredEngine(), ByteBudgetLRU(1 << 20),  # type: ignore[arg-type]
                                    InputLimits(allow_private_networks=True))
        workers = PromptWorkers(segmenter, workers=1, fetch_stage=stage)
        try:
            url = f"http://127.0.0.1:{hanging.getsockname()[1]}/photo.png"
            slow = asyncio.create_task(workers.embed(ImageSource("url", url)))
            picture = cv2.imencode(".png", np.full((8, 8, 3), 7, np.uint8))[1].tobytes()
            embedded = await asyncio.wait_for(workers.embed(ImageSource("bytes", picture)), 10)
            assert embedded.width == 8 and not slow.done()
        finally:
            hanging.close()  # the download fails at once
            with pytest.raises(ImageFetchError):
                await asyncio.wait_for(slow, 30)
            workers.close()
            await stage.close()

    asyncio.run(main())


def test_prompt_results_keep_no_full_resolution_mask():
    """Before, every mask of every prompt set kept its full-resolution array until the reply was sent: 16
    boxes x 3 masks at 40 MP were 1.9 GB. Now a result keeps its low-res logits and makes the mask on call."""
    from sam2serve.amg.masks import upsample_logits
    from sam2serve.prompts import MaskOutputs
    from sam2serve.prompts.render import render_masks

    logits = np.random.default_rng(0).normal(size=(3, 256, 256)).astype(np.float32)
    hw = (1200, 1600)
    masks = render_masks(logits, np.array([0.5, 0.9, 0.7]), hw, 0.0, MaskOutputs(rle=True),
                         ["a.0", "a.1", "a.2"], "mask", {})
    for k, result in enumerate(masks):
        held = [v for v in vars(result).values() if isinstance(v, np.ndarray)]
        assert not any(a.size >= hw[0] * hw[1] for a in held)
        np.testing.assert_array_equal(result.mask(), upsample_logits(logits[k], hw) > 0.0)
        assert result.area == int(result.mask().sum()) and result.rle is not None
