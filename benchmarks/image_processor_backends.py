"""The two image-processor backends side by side: EovSegImageProcessorPil (PIL's resize, the original's) against
EovSegImageProcessor (torchvision's antialiased resize).

    python benchmarks/image_processor_backends.py            # speed and pixel differences, 8 images (CPU)
    python benchmarks/image_processor_backends.py --threads 2 --repeats 9
    python benchmarks/image_processor_backends.py --guard    # also the effect on the fidelity guard's outputs

Speed: one call on a batch of 8 random images of different sizes (the processors' default 640 short side: most are
downscaled, two upscaled), median over `--repeats` runs after a warm-up, with the torch threads given.
Pixels: per image, the largest difference between the backends in grey levels (0-255 units, after un-normalizing)
and the share of pixels that differ.
Guard (`--guard`): the fixture checkpoint of tests/fixtures/original-r50 converted (as side_by_side.py builds it),
run (2 threads) on the guard's photo (400x600, upscaled x1.6 to 640x960) and on the same photo enlarged
to 1200x1800 beforehand (so that the processors downscale it to 640x960): the largest difference between the
backends' class and mask logits, and whether the panoptic results are the same. Takes a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eovseg.processing.image_processing_eovseg import EovSegImageProcessor  # noqa: E402
from eovseg.processing.image_processing_pil_eovseg import EovSegImageProcessorPil  # noqa: E402


FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "original-r50"
# (height, width): phone photos, video frames, COCO-like images, a square thumbnail and two upscaled ones.
SIZES = [(3024, 4032), (1080, 1920), (720, 1280), (480, 640), (427, 640), (1536, 2048), (300, 300), (400, 600)]
MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like uint8 image: random colours at 1/16 resolution enlarged bicubically, plus mild noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = np.asarray(PIL.Image.fromarray(small).resize((width, height), PIL.Image.BICUBIC)).astype(np.int16)
    image += rng.integers(-8, 9, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def grey_levels(pixel_values: torch.Tensor) -> torch.Tensor:
    return pixel_values * STD + MEAN


def time_call(processor, images, repeats: int) -> float:
    processor(images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        processor(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_resize_only(processor, images, repeats: int) -> float:
    """The backend's own step: its `resize` of the 8 decoded images to their processed sizes."""
    from transformers.image_utils import SizeDict

    from eovseg.inputs import get_resize_output_shape

    jobs = [(processor._backend_image(image), SizeDict(**dict(zip(("height", "width"), get_resize_output_shape(
        *image.shape[:2], 640, 2560))))) for image in images]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for image, size in jobs:
            processor.resize(image, size, resample=processor.resample)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def speed_and_pixels(repeats: int) -> dict:
    images = [smooth_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    pil, torchvision = EovSegImageProcessorPil(), EovSegImageProcessor()
    report = {"images": [f"{h}x{w}" for h, w in SIZES], "threads": torch.get_num_threads()}
    report["pil_seconds"] = time_call(pil, images, repeats)
    report["torchvision_seconds"] = time_call(torchvision, images, repeats)
    report["pil_resize_seconds"] = time_resize_only(pil, images, repeats)
    report["torchvision_resize_seconds"] = time_resize_only(torchvision, images, repeats)
    rows = []
    for (h, w), image in zip(SIZES, images):
        a, b = pil(image), torchvision(image)
        diff = (grey_levels(a["pixel_values"]) - grey_levels(b["pixel_values"])).abs()
        valid = a["pixel_mask"].bool()[:, None].expand_as(diff)
        rows.append({
            "size": f"{h}x{w}", "resized": f"{int(a['pixel_mask'][0].sum(0).max())}x{int(a['pixel_mask'][0].sum(1).max())}",
            "max_grey_levels": round(float(diff.max()), 3),
            "percent_pixels_differing": round(100 * float((diff[valid] > 0.5).float().mean()), 3),
        })
    report["pixels"] = rows
    return report


def guard_effect() -> dict:
    # The fixture model as side_by_side.py builds it (the conversion's `convert` on the rebuilt checkpoint, the
    # fixture's vocabulary encoded once), run with 2 threads as the fixture's reference run.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from side_by_side import Fixture, Ours

    torch.set_num_threads(2)
    fixture = Fixture(str(FIXTURE))
    ours = Ours(fixture, torch.float32, torch.device("cpu"))
    photo = PIL.Image.open(FIXTURE / "coffee.png").convert("RGB")
    enlarged = photo.resize((1800, 1200), PIL.Image.BICUBIC)
    report = {}
    for name, image in (("guard photo 400x600 (upscaled)", photo), ("photo enlarged to 1200x1800 (downscaled)", enlarged)):
        runs = {}
        for backend, processor in (("pil", EovSegImageProcessorPil()), ("torchvision", EovSegImageProcessor())):
            inputs = processor(image)
            with torch.no_grad():
                outputs = ours.model(pixel_values=inputs["pixel_values"], **ours.vocabulary)
            panoptic = processor.post_process_panoptic_segmentation(
                outputs, threshold=fixture.expected["object_mask_threshold"],
                overlap_mask_area_threshold=fixture.expected["overlap_threshold"], label_ids_to_fuse=ours.stuff)[0]
            semantic = processor.post_process_semantic_segmentation(outputs)[0]
            runs[backend] = (inputs["pixel_values"], outputs, panoptic, semantic)
        (pa, oa, qa, sa), (pb, ob, qb, sb) = runs["pil"], runs["torchvision"]
        report[name] = {
            "pixel_values_equal": bool(torch.equal(pa, pb)),
            "max_grey_levels": round(float((grey_levels(pa) - grey_levels(pb)).abs().max()), 3),
            "class_logits_max_abs_diff": float((oa.class_queries_logits - ob.class_queries_logits).abs().max()),
            "mask_logits_max_abs_diff": float((oa.masks_queries_logits - ob.masks_queries_logits).abs().max()),
            "panoptic_segments": [len(qa["segments_info"]), len(qb["segments_info"])],
            "panoptic_identical": qa["segments_info"] == qb["segments_info"]
            and bool(torch.equal(qa["segmentation"], qb["segmentation"])),
            "semantic_percent_pixels_differing": round(100 * float((sa != sb).float().mean()), 4),
        }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per backend (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the speed runs")
    parser.add_argument("--guard", action="store_true", help="also measure the effect on the fidelity guard")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = {"speed_and_pixels": speed_and_pixels(args.repeats)}
    speed = report["speed_and_pixels"]
    print(f"8 images ({', '.join(speed['images'])}), {speed['threads']} threads, median of {args.repeats}:")
    print(f"  PIL backend         {speed['pil_seconds'] * 1000:8.1f} ms")
    print(f"  torchvision backend {speed['torchvision_seconds'] * 1000:8.1f} ms")
    print(f"  of which the resize alone: PIL {speed['pil_resize_seconds'] * 1000:.1f} ms, "
          f"torchvision {speed['torchvision_resize_seconds'] * 1000:.1f} ms")
    for row in speed["pixels"]:
        print(f"  {row['size']:>10} -> {row['resized']:>9}: max {row['max_grey_levels']} grey levels, "
              f"{row['percent_pixels_differing']}% of pixels differ")
    if args.guard:
        report["guard"] = guard_effect()
        for name, row in report["guard"].items():
            print(f"guard model, {name}: {json.dumps(row)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
