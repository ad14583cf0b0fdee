"""GPU check (not collected by pytest): Meta's generator with its real CUDA small-region kernel vs ours.

On CPU, Meta's generator skips min_mask_region_area (its CUDA extension is missing), so CPU parity runs
substitute our OpenCV connected components. This script runs Meta's generator on an NVIDIA GPU with
`sam2._C` built, the synthetic decoder injected, and compares with our CPU generator:

    SAM2_BUILD_CUDA=1 pip install --no-deps --no-build-isolation sam2==1.1.0   # builds sam2._C
    PYTHONPATH=server:export python tests/gpu/check_small_region_parity_cuda.py OUT.json IMAGE...
    ... check_small_region_parity_cuda.py --mode=cpu-cudakernel OUT.json IMAGE...  # only the kernel on GPU
    ... check_small_region_parity_cuda.py --mode=cpu-standin OUT.json IMAGE...     # all CPU: a dry run
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
import torch


def cuda_kernel_from_cpu():
    """Run Meta's CUDA kernel on CPU tensors (round trip), so everything else stays on CPU numerics."""
    import contextlib

    import sam2.utils.misc as misc

    original = misc.get_connected_components

    def round_trip(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, counts = original(mask.cuda())
        return labels.cpu(), counts.cpu()

    @contextlib.contextmanager
    def patched():
        misc.get_connected_components = round_trip
        try:
            yield
        finally:
            misc.get_connected_components = original

    return patched


def main(out_path: str, images: list[str], mode: str = "cuda") -> int:
    """mode: "cuda" (Meta's generator on the GPU), "cpu-cudakernel" (on CPU, only the kernel on the GPU),
    "cpu-standin" (all CPU, our stand-in kernel: a dry run)."""
    device = "cuda" if mode == "cuda" else "cpu"
    if mode != "cpu-standin":
        from sam2 import _C  # noqa: F401  (fails loudly when the CUDA extension was not built)
    from contextlib import nullcontext

    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2

    from sam2serve.amg import AutoMaskGenerator, GeneratorParams
    from sam2serve.amg.params import fal_defaults
    from sam2serve.engines.manifest import Manifest, Weights
    from sam2serve.images import read_rgb, synthetic_scene
    from sam2serve_export.parity import compare_masks, format_report
    from sam2serve_export.reference import cpu_small_region_kernel, reference_kwargs
    from sam2serve_export.synthetic import SyntheticEngine, inject_synthetic_decoder

    kernel = {"cuda": nullcontext, "cpu-standin": cpu_small_region_kernel}.get(mode) or cuda_kernel_from_cpu()
    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device=device, mode="eval")
    inject_synthetic_decoder(model)
    d = model.sam_mask_decoder
    manifest = Manifest("sam2.1_hiera_tiny", "", Weights("untrained", seed=0), 1024, [0.485, 0.456, 0.406],
                        [0.229, 0.224, 0.225], 0.0, 256, 4, bool(d.dynamic_multimask_via_stability),
                        float(d.dynamic_multimask_stability_delta), float(d.dynamic_multimask_stability_thresh),
                        18, {})
    ours = AutoMaskGenerator(SyntheticEngine(manifest))
    configs = {
        "meta defaults, no small regions": GeneratorParams(points_per_side=16),
        "fal (min_mask_region_area=100)": replace(fal_defaults(), points_per_side=16),
        "meta defaults + min_mask_region_area=25": GeneratorParams(points_per_side=16, min_mask_region_area=25),
        "crop_n_layers=1 + area 100": GeneratorParams(points_per_side=16, crop_n_layers=1, min_mask_region_area=100),
        "use_m2m + area 100": GeneratorParams(points_per_side=16, use_m2m=True, min_mask_region_area=100),
    }
    pictures = {p.rsplit("/", 1)[-1]: read_rgb(p) for p in images} | {"synthetic": synthetic_scene(480, 640, 3)}
    rows, ok = [], True
    for label, params in configs.items():
        for name, image in pictures.items():
            generator = SAM2AutomaticMaskGenerator(model, **reference_kwargs(params))
            with warnings.catch_warnings(record=True) as caught, torch.inference_mode(), kernel():
                warnings.simplefilter("always")
                start = time.perf_counter()
                reference = generator.generate(image)
                ref_s = time.perf_counter() - start
            skipped = [str(w.message)[:80] for w in caught if "Skipping the post-processing" in str(w.message)]
            result = ours.generate(image, params)
            report = compare_masks(reference, result.records)
            passed = (not skipped and report.reference_masks == report.our_masks and report.mean_iou >= 0.999)
            ok &= passed
            print(mode, format_report(f"{name} [{label}]", report), "PASS" if passed else f"FAIL {skipped}", flush=True)
            rows.append({"image": name, "config": label, **report.as_dict(), "reference_s": ref_s,
                         "cleaned": result.counts["low_res_cleaned"], "kernel_skipped": skipped, "pass": passed})
    with open(out_path, "w") as f:
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        json.dump({"device": name, "mode": mode, "torch": torch.__version__, "rows": rows, "pass": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    np.seterr(all="ignore")
    if sys.argv[1].startswith("--mode="):
        raise SystemExit(main(sys.argv[2], sys.argv[3:], mode=sys.argv[1].split("=", 1)[1]))
    raise SystemExit(main(sys.argv[1], sys.argv[2:]))
