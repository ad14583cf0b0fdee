"""The factored decoder at run time, for any backend that can run a graph by role.

`decoder_context` runs once per image (or crop) and its outputs are kept beside the image features for as long
as those live; `prompt_head` predicts the IoU of every mask token for a batch of prompts; `mask_head` makes the
logits of every mask token for the prompts that need them. Prompts with a mask input (m2m refinement) use the
whole decoder graph instead: a per-prompt dense embedding breaks the precomputation.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .base import AllTokensEngine, DecodedMasks, ImageFeatures
from .contract import (
    DECODER_CONTEXT_INPUTS,
    MASK_HEAD_OUTPUTS,
    PROMPT_HEAD_OUTPUTS,
    PROMPT_INPUTS,
    PROMPT_STATE,
)
from .manifest import Manifest, ManifestError
from .mask_selection import select_multimask, select_tokens

# A backend's way to run one graph: named inputs → outputs in the graph's declared order.
RunGraph = Callable[[dict[str, np.ndarray]], list[np.ndarray]]

# Working memory per prompt in a head's batch on ONNX Runtime's CPU provider: peak RSS growth measured with hiera
# tiny, one point per prompt, batches of 8 and 32 (16 MB and 57 MB: the mask head's [4·64·64, 128] maps are 8 MB).
PROMPT_HEAD_BYTES_PER_PROMPT = 20 << 20
MASK_HEAD_BYTES_PER_PROMPT = 60 << 20
DEFAULT_DECODER_MEMORY = 512 << 20
# Prompt-head batch on CPUs: its per-prompt tensors are [H·T, N] float32 (1 MB each, a few dozen passes over them per
# run), so small batches keep them in the cores' caches; below 2 the graph's fixed per-run cost (≈ 250 small
# operators) dominates. Accelerators (TensorRT, CUDA) take the largest batch memory allows instead.
CPU_PROMPT_HEAD_BATCH = 8


def batch_for_memory(budget_bytes: int, bytes_per_prompt: int, cap: int = 64) -> int:
    """The largest batch whose working memory fits the budget (at least 1, at most `cap`)."""
    return max(1, min(cap, budget_bytes // max(1, bytes_per_prompt)))


@dataclass
class DecoderStats:
    """Time spent in each graph and how many prompts it saw (for `sam2serve bench` and logs)."""

    context_s: float = 0.0
    contexts: int = 0
    prompt_head_s: float = 0.0
    prompts: int = 0
    mask_head_s: float = 0.0
    masked_prompts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, what: str, seconds: float, count: int) -> None:
        counts = {"context": "contexts", "prompt_head": "prompts", "mask_head": "masked_prompts"}
        with self._lock:
            setattr(self, f"{what}_s", getattr(self, f"{what}_s") + seconds)
            setattr(self, counts[what], getattr(self, counts[what]) + count)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def check_factored_graphs(context_outputs: list[str], prompt_inputs: list[str], prompt_outputs: list[str],
                          mask_inputs: list[str], mask_outputs: list[str]) -> None:
    """The three graphs fit together: each head reads context tensors by name, plus its own inputs."""
    shared = set(context_outputs)
    own_prompt = [n for n in prompt_inputs if n not in shared]
    own_mask = [n for n in mask_inputs if n not in shared]
    problems = []
    if own_prompt != list(PROMPT_INPUTS):
        problems.append(f"prompt_head inputs outside the context are {own_prompt}, expected {list(PROMPT_INPUTS)}")
    if prompt_outputs != list(PROMPT_HEAD_OUTPUTS):
        problems.append(f"prompt_head outputs are {prompt_outputs}, expected {list(PROMPT_HEAD_OUTPUTS)}")
    if own_mask != list(PROMPT_STATE):
        problems.append(f"mask_head inputs outside the context are {own_mask}, expected {list(PROMPT_STATE)}")
    if mask_outputs != list(MASK_HEAD_OUTPUTS):
        problems.append(f"mask_head outputs are {mask_outputs}, expected {list(MASK_HEAD_OUTPUTS)}")
    if problems:
        raise ManifestError("the factored decoder graphs do not fit together: " + "; ".join(problems))


class FactoredDecoder:
    """decoder_context → prompt_head → mask_head, batched by memory, with the context cached per image."""

    def __init__(self, manifest: Manifest, run_context: RunGraph, run_prompt: RunGraph, run_mask: RunGraph,
                 context_outputs: list[str], prompt_inputs: list[str], mask_inputs: list[str],
                 memory_bytes: int = DEFAULT_DECODER_MEMORY, max_batch: int = 64, workers: int = 1,
                 prompt_batch: int | None = None, side_by_side: tuple[RunGraph, RunGraph] | None = None) -> None:
        """`max_batch`: the largest batch a head accepts (a TensorRT plan's profile); memory bounds it further, and
        `prompt_batch` bounds the prompt head's batch below that (CPUs: see CPU_PROMPT_HEAD_BATCH).
        `workers` > 1 runs a call's batches on that many threads at once, through `side_by_side` (the prompt and
        mask heads on one thread each: many small memory-bound operators scale better across runs than within
        one); they share the memory budget. A call with one batch (a click) runs `run_prompt`/`run_mask`, which
        may use every thread: its latency is what counts."""
        self.manifest = manifest
        self._run_context, self._run_prompt, self._run_mask = run_context, run_prompt, run_mask
        self._side_prompt, self._side_mask = side_by_side or (run_prompt, run_mask)
        self._context_outputs = context_outputs
        self._prompt_context = [n for n in prompt_inputs if n in set(context_outputs)]
        self._mask_context = [n for n in mask_inputs if n in set(context_outputs)]
        self.workers = max(1, workers)
        per_worker = memory_bytes // self.workers  # the workers' batches are in flight at once
        self.prompt_batch = batch_for_memory(per_worker, PROMPT_HEAD_BYTES_PER_PROMPT, max_batch)
        if prompt_batch is not None:
            self.prompt_batch = max(1, min(self.prompt_batch, prompt_batch))
        self.mask_batch = batch_for_memory(per_worker, MASK_HEAD_BYTES_PER_PROMPT, max_batch)
        self.stats = DecoderStats()
        self._pool = ThreadPoolExecutor(self.workers, "sam2serve-decoder") if self.workers > 1 else None
        self._contexts: dict[int, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def _batches(self, count: int, batch: int) -> list[slice]:
        """Slices of at most `batch` prompts, at least one per worker when there are enough prompts."""
        size = max(1, min(batch, -(-count // self.workers)))
        return [slice(first, min(first + size, count)) for first in range(0, count, size)]

    def _run_all(self, run: RunGraph, side_by_side: RunGraph,
                 feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        if self._pool is None or len(feeds) == 1:
            return [run(f) for f in feeds]
        return list(self._pool.map(side_by_side, feeds))

    def context(self, features: ImageFeatures) -> dict[str, np.ndarray]:
        """The decoder context of these features, computed on first use and dropped with the features."""
        key = id(features)
        with self._lock:
            found = self._contexts.get(key)
        if found is not None:
            return found
        start = time.perf_counter()
        outputs = self._run_context({name: getattr(features, name) for name in DECODER_CONTEXT_INPUTS})
        context = dict(zip(self._context_outputs, outputs, strict=True))
        self.stats.add("context", time.perf_counter() - start, 1)
        with self._lock:
            if key not in self._contexts:
                self._contexts[key] = context
                weakref.finalize(features, self._forget, key)
            return self._contexts[key]

    def _forget(self, key: int) -> None:
        with self._lock:
            self._contexts.pop(key, None)

    def _prompt_chunks(self, features: ImageFeatures, point_coords: np.ndarray,
                       point_labels: np.ndarray) -> list[tuple[slice, np.ndarray, dict[str, np.ndarray]]]:
        """The prompt head batch by batch: (prompts, IoU, state) of each."""
        context = self.context(features)
        shared = {name: context[name] for name in self._prompt_context}
        coords = np.ascontiguousarray(point_coords, np.float32)
        labels = np.ascontiguousarray(point_labels, np.float32)
        start = time.perf_counter()
        batches = self._batches(len(coords), self.prompt_batch)
        feeds = [{**shared, PROMPT_INPUTS[0]: coords[rows], PROMPT_INPUTS[1]: labels[rows]} for rows in batches]
        chunks = self._run_all(self._run_prompt, self._side_prompt, feeds)
        self.stats.add("prompt_head", time.perf_counter() - start, len(coords))
        return [(rows, iou, dict(zip(PROMPT_STATE, state, strict=True)))
                for rows, (iou, *state) in zip(batches, chunks, strict=True)]

    def prompt_head(self, features: ImageFeatures, point_coords: np.ndarray,
                    point_labels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """IoU of every mask token [B, M] and the per-prompt state the mask head reads."""
        chunks = self._prompt_chunks(features, point_coords, point_labels)
        if len(chunks) == 1:
            return chunks[0][1], chunks[0][2]
        return (np.concatenate([iou for _, iou, _ in chunks]),
                {name: np.concatenate([state[name] for _, _, state in chunks]) for name in PROMPT_STATE})

    def mask_head(self, features: ImageFeatures, state: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """Logits of every mask token [len(rows), M, 256, 256] for the prompts `rows` of a prompt-head batch."""
        context = self.context(features)
        shared = {name: context[name] for name in self._mask_context}
        size = self.manifest.low_res_mask_size
        masks = np.empty((len(rows), self.manifest.mask_tokens, size, size), np.float32)
        start = time.perf_counter()
        batches = self._batches(len(rows), self.mask_batch)
        # Consecutive rows (every prompt, at zero thresholds) are sliced: views, where indexing would copy megabytes
        # of state per batch.
        first = int(rows[0]) if len(rows) else 0
        consecutive = bool(np.array_equal(rows, np.arange(first, first + len(rows))))

        def state_rows(b: slice) -> slice | np.ndarray:
            return slice(first + b.start, first + b.stop) if consecutive else rows[b]

        feeds = [{**shared, **{name: state[name][state_rows(b)] for name in PROMPT_STATE}} for b in batches]
        outputs = self._run_all(self._run_mask, self._side_mask, feeds)
        for b, out in zip(batches, outputs, strict=True):
            masks[b] = out[0]
        self.stats.add("mask_head", time.perf_counter() - start, len(rows))
        return masks

    def decode_all_tokens(self, features: ImageFeatures, point_coords: np.ndarray,
                          point_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        iou, state = self.prompt_head(features, point_coords, point_labels)
        return self.mask_head(features, state, np.arange(len(iou))), iou

    def decode(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
               multimask: bool = True) -> DecodedMasks:
        masks, iou = self.decode_all_tokens(features, point_coords, point_labels)
        return DecodedMasks(*select_tokens(masks, iou, multimask, self.manifest))

    def decode_above(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
                     iou_threshold: float) -> DecodedMasks:
        """Multimask outputs; logits only for prompts with a multimask IoU above `iou_threshold`, zero for the
        others (callers drop their candidates by IoU before reading logits)."""
        chunks = self._prompt_chunks(features, point_coords, point_labels)
        iou = np.concatenate([chunk_iou for _, chunk_iou, _ in chunks])
        _, multimask_iou = select_multimask(iou, iou)
        size = self.manifest.low_res_mask_size
        # Only the multimask tokens, contiguous: callers flatten them to candidates without a copy, and the pages
        # of prompts without masks are never touched (at fal's defaults that is nearly every prompt). The state
        # stays in its prompt-head batches (2 MB per prompt: concatenating it cost ~4 % of a segmentation).
        masks = np.zeros((len(iou), multimask_iou.shape[1], size, size), np.float32)
        for prompts, chunk_iou, state in chunks:
            rows = np.flatnonzero((multimask_iou[prompts] > iou_threshold).any(axis=1))
            if len(rows):
                logits = self.mask_head(features, state, rows)
                masks[prompts.start + rows] = select_multimask(logits, chunk_iou[rows])[0]
        return DecodedMasks(masks, multimask_iou)


class FactoredDecoding(AllTokensEngine):
    """An `AllTokensEngine` that may have a factored decoder: its `decode_above` then runs the mask head only for
    the prompts that need masks; `factored` exposes the decoder (and its stats)."""

    _factored: FactoredDecoder | None = None

    @property
    def factored(self) -> FactoredDecoder | None:
        """The factored decoder, when the engine has one."""
        return self._factored

    @property
    def can_skip_masks(self) -> bool:
        """True when masks can be made for some prompts only (`decode_above` skips the others)."""
        return self._factored is not None

    def decode_above(self, features: ImageFeatures, point_coords: np.ndarray, point_labels: np.ndarray,
                     iou_threshold: float) -> DecodedMasks:
        """Multimask decoding that makes masks only for prompts with some multimask IoU above `iou_threshold`;
        the other prompts' logits are left at zero (callers filter them out by IoU). Without a factored decoder
        (engines exported, or plans built, before it existed) every prompt gets its masks."""
        if self._factored is None:
            return super().decode_above(features, point_coords, point_labels, iou_threshold)
        return self._factored.decode_above(features, point_coords, point_labels, iou_threshold)
