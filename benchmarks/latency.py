"""Per-component latency and throughput of EOV-Seg variants, plus parameter counts.

    python benchmarks/latency.py                               # all three published variants, CPU, batch 1 and 8
    python benchmarks/latency.py --variants r50 --batch-sizes 1 --iters 3 --device cuda --dtypes float32 float16 --compile

Weights are random (timing does not depend on their values). The vocabulary is an ADE20K-150-sized one with
precomputed text embeddings (a cached vocabulary costs no text pass). Inputs are 640x960 (640 short side, the test
resize of a 4:3 image). Components are timed with forward hooks on the model's own modules, so the measured forward is
the real one: CNN CLIP backbone, ViT first block, light aggregator neck, light-weight decoder (VAS + 3 stages), CLIP
out-of-vocabulary branch (pooling + ensemble), and panoptic post-processing to a 480x640 target.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from eovseg import EovSegConfig, EovSegForPanopticSegmentation
from eovseg.configuration_eovseg import PUBLISHED_VARIANTS

COMPONENTS = {
    "backbone": "clip_backbone",
    "vit_block": "spatial_extractor",
    "neck": "aggregator",
    "decoder": "decoder",
    "clip_branch": ("clip_backbone.out_of_vocabulary", "ensemble"),
}


def parameter_counts(model: EovSegForPanopticSegmentation) -> dict[str, int]:
    def count(module):
        return sum(p.numel() for p in module.parameters())

    clip = model.clip_backbone.clip_model
    text = count(clip) - count(clip.visual)
    total = count(model)
    return {
        "total": total,
        "without_text_tower": total - text,
        "text_tower": text,
        "cnn_clip_visual": count(clip.visual),
        "vit_first_block": count(model.spatial_extractor),
        "neck": count(model.aggregator),
        "decoder": count(model.decoder) + count(model.void_embedding),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


class ComponentTimer:
    def __init__(self, model, device, components=None):
        self.device = device
        self.times = defaultdict(float)
        self._start = {}
        self._handles = []
        for name, attrs in (components or COMPONENTS).items():
            for attr in attrs if isinstance(attrs, tuple) else (attrs,):
                module = model.get_submodule(attr)
                self._handles.append(module.register_forward_pre_hook(self._pre(name)))
                self._handles.append(module.register_forward_hook(self._post(name)))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _pre(self, name):
        def hook(module, args):
            self._sync()
            self._start[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(module, args, output):
            self._sync()
            self.times[name] += time.perf_counter() - self._start[name]
        return hook

    def reset(self):
        self.times.clear()

    def remove(self):
        for handle in self._handles:
            handle.remove()


def ade_like_vocabulary(num_classes: int = 150, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (num_classes,), generator=generator)
    return counts, torch.rand(num_classes, generator=generator) < 0.5


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def _peak_mib(device, baseline):
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20 if device.type == "cuda" else float("nan")


def time_inference(model, forward, vocabulary, batch, device, dtype, iters, height, width, timer):
    """Median seconds per batch (forward + post-processing), per-component times and peak memory growth."""
    from eovseg.processing import EovSegImageProcessor

    image_processor = EovSegImageProcessor()
    stuff_ids = list(range(100, len(vocabulary["synonym_counts"])))  # ADE20K-150: 100 things, then 50 stuff
    pixel_values = torch.randn(batch, 3, height, width, device=device, dtype=dtype)
    with torch.no_grad():
        start = time.perf_counter()
        forward(pixel_values, **vocabulary)  # warm-up (and compilation)
        _sync(device)
        warm_up = time.perf_counter() - start
    baseline = _reset_peak(device)
    per_iter, post_times = [], []
    timer.reset()
    for _ in range(iters):
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            outputs = forward(pixel_values, **vocabulary)
            _sync(device)
            mid = time.perf_counter()
            image_processor.post_process_panoptic_segmentation(
                outputs, label_ids_to_fuse=stuff_ids, target_sizes=[(480, 640)] * batch)
            end = time.perf_counter()
        per_iter.append(end - start)
        post_times.append(end - mid)
    rows = {name: timer.times[name] / iters for name in COMPONENTS}
    rows["post_processing"] = statistics.median(post_times)
    return statistics.median(per_iter), rows, _peak_mib(device, baseline), warm_up


def time_training_step(model, vocabulary, device, dtype, height, width):
    """One optimizer step on a batch of 2 with random targets: seconds and peak memory growth."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    pixel_values = torch.randn(2, 3, height, width, device=device, dtype=dtype)
    masks = [(torch.rand(3, height, width, device=device) > 0.5).to(dtype) for _ in range(2)]
    labels = [torch.randint(0, len(vocabulary["synonym_counts"]), (3,), device=device) for _ in range(2)]
    seconds = []
    baseline = _reset_peak(device)
    for _ in range(2):  # the first step allocates the optimizer state
        _sync(device)
        start = time.perf_counter()
        loss = model(pixel_values, mask_labels=masks, class_labels=labels, **vocabulary).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    model.eval()
    return seconds[-1], _peak_mib(device, baseline)


def benchmark_variant(variant, batch_sizes, device, iters, height, width, dtypes, compile_modes, train_step=False):
    config = EovSegConfig.from_variant(variant)
    base = EovSegForPanopticSegmentation(config).eval()
    counts = parameter_counts(base)
    print(f"\n== {variant}: {counts['total'] / 1e6:.1f}M parameters in all, {counts['without_text_tower'] / 1e6:.1f}M "
          f"without the CLIP text tower ({counts['text_tower'] / 1e6:.1f}M); trainable {counts['trainable'] / 1e6:.1f}M")
    print("   " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items() if k not in ("total", "without_text_tower", "text_tower", "trainable")))
    synonym_counts, seen = ade_like_vocabulary()
    text = torch.nn.functional.normalize(torch.randn(int(synonym_counts.sum()), config.embed_dim), dim=-1)
    for dtype in dtypes:
        model = base.to(device=device, dtype=dtype)
        vocabulary = {"text_embeddings": text.to(device, dtype), "synonym_counts": synonym_counts.to(device),
                      "class_seen_mask": seen.to(device)}
        timer = ComponentTimer(model, device)
        name = str(dtype).replace("torch.", "")
        for compiled in compile_modes:
            forward = torch.compile(model) if compiled else model
            for batch in batch_sizes:
                total, rows, peak, warm_up = time_inference(
                    model, forward, vocabulary, batch, device, dtype, iters, height, width, timer)
                mode = "compiled" if compiled else "eager"
                print(f"   batch {batch} @ {height}x{width} on {device.type} ({name}, {mode}): {total * 1000:.1f} ms/batch, "
                      f"{batch / total:.2f} images/s, peak +{peak:.0f} MiB (first call {warm_up:.1f} s)")
                if not compiled:
                    for part, seconds in rows.items():
                        print(f"      {part:<16} {seconds * 1000:9.1f} ms  ({100 * seconds / total:5.1f}%)")
        if train_step:
            seconds, peak = time_training_step(model, vocabulary, device, dtype, height, width)
            print(f"   training step, batch 2 ({name}): {seconds:.2f} s, peak +{peak:.0f} MiB")
        timer.remove()
    del base, model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(PUBLISHED_VARIANTS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="also time the model under torch.compile")
    parser.add_argument("--train-step", action="store_true", help="also time one training step (batch 2)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--params-only", action="store_true", help="print parameter counts only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.params_only:
        for variant in args.variants:
            counts = parameter_counts(EovSegForPanopticSegmentation(EovSegConfig.from_variant(variant)))
            print(variant, {k: f"{v / 1e6:.1f}M" for k, v in counts.items()})
        return
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    for variant in args.variants:
        benchmark_variant(variant, args.batch_sizes, device, args.iters, args.height, args.width,
                          [getattr(torch, d) for d in args.dtypes], [False, True] if args.compile else [False],
                          args.train_step)


if __name__ == "__main__":
    main()
