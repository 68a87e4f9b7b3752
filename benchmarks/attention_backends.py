"""The attention functions against each other on the fidelity guard's fixture: `attn_implementation="eager"` (attention
written out) and `"sdpa"` (torch's scaled_dot_product_attention, which the original's nn.MultiheadAttention calls).

    python benchmarks/attention_backends.py --fixture tests/fixtures/original-r50 --rounds 5 --threads 2

One R50 model converted from the fixture's deterministic weights by the conversion command and loaded with
`from_pretrained`, as the guard (tests/test_original_fixture.py) does, runs the fixture's photo through its processor
(640x960) with its default vocabulary (ADE20K-150, embeddings stored by the conversion). For each function: the largest relative difference
`max|a - b| / max(1, max|b|)` (the guard's measure) of the stage and final class logits and the stage mask logits
against the original's outputs, next to the original's own float32 noise (`noise.json`); then the time of one
forward pass per image, the functions alternating call by call (E S E S ...) so that machine load hits both alike:
median and every round's figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from eovseg import EovSegForPanopticSegmentation, EovSegProcessor
from eovseg.conversion_scripts.convert_original_checkpoint import main as convert_main

IMPLEMENTATIONS = ("eager", "sdpa")


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach().double().cpu(), reference.detach().double()
    return ((ours - reference).abs().max() / max(1.0, reference.abs().max().item())).item()


def differences(outputs, expected) -> dict[str, float]:
    """The guard's comparisons: every stage's class logits and (every 4th row and column) mask logits, and the final
    ensembled class logits, against the original's."""
    stage_classes = [relative_difference(ours[0], reference) for ours, reference in
                     zip(outputs.stage_class_queries_logits, expected["stage_class_logits"])]
    stage_masks = [relative_difference(ours[0, :, ::4, ::4], reference) for ours, reference in
                   zip(outputs.stage_masks_queries_logits, expected["stage_mask_logits_sub4"])]
    return {
        "final_class_logits": relative_difference(outputs.class_queries_logits[0], expected["final_class_logits"]),
        "stage_class_logits": max(stage_classes),
        "stage_mask_logits": max(stage_masks),
    }


def converted_model(fixture: Path, expected: dict, folder: Path):
    """The guard's model and input: the fixture's weights in the original's format, converted by our command with
    ADE20K-150 as default vocabulary and COCO panoptic as training vocabulary, loaded; the photo through the
    processor."""
    sys.path.insert(0, str(fixture))
    from refweights import make_state_dict

    manifest = json.loads((fixture / "manifest.json").read_text())
    overrides = torch.load(fixture / "overrides.pt", weights_only=True)
    torch.save({"model": make_state_dict(manifest, 0, overrides)}, folder / "model_final.pth")
    names, things = expected["test_class_names"], set(expected["thing_contiguous_ids"])
    (folder / "vocabulary.json").write_text(
        json.dumps({"classes": names, "is_thing": [i in things for i in range(len(names))]}))
    (folder / "train_vocabulary.json").write_text(json.dumps(expected["train_class_names"]))
    code = convert_main(["--checkpoint_path", str(folder / "model_final.pth"), "--variant", "r50",
                         "--output_dir", str(folder / "model"), "--vocabulary", str(folder / "vocabulary.json"),
                         "--train_vocabulary", str(folder / "train_vocabulary.json")])
    if code:
        raise SystemExit(f"the conversion failed (exit {code})")
    model = EovSegForPanopticSegmentation.from_pretrained(folder / "model").eval()
    processor = EovSegProcessor.from_pretrained(folder / "model")
    pixels = processor(images=Image.open(fixture / "coffee.png").convert("RGB"), return_tensors="pt")["pixel_values"]
    return model, pixels


def forward(model, pixels: torch.Tensor, implementation: str):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(pixel_values=pixels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", default="tests/fixtures/original-r50")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per function (after one warm-up call)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fixture = Path(args.fixture)
    if not (fixture / "refweights.py").is_file():
        raise SystemExit(f"--fixture {fixture}: no refweights.py there (the original-r50 fixture folder).")
    noise = json.loads((fixture / "noise.json").read_text())
    expected = torch.load(fixture / "expected.pt", weights_only=True)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        model, pixels = converted_model(fixture, expected, Path(folder))
    model, pixels = model.to(device), pixels.to(device)

    outputs = {name: forward(model, pixels, name) for name in IMPLEMENTATIONS}  # also the warm-up call of each
    print(f"R50, fixture photo at {tuple(pixels.shape[-2:])}, ADE20K-150, {device}, "
          f"{torch.get_num_threads()} threads: largest relative difference against the original's outputs")
    print(f"{'':>8} {'final class':>12} {'stage class':>12} {'stage masks':>12}")
    print(f"{'noise':>8} {noise['final_class_logits']:12.2e} {noise['final_class_logits']:12.2e} "
          f"{noise['last_stage_masks']:12.2e}")
    for name in IMPLEMENTATIONS:
        diff = differences(outputs[name], expected)
        holds = diff["final_class_logits"] < noise["final_class_logits"] and \
            diff["stage_class_logits"] < noise["final_class_logits"] and diff["stage_mask_logits"] < noise["last_stage_masks"]
        print(f"{name:>8} {diff['final_class_logits']:12.2e} {diff['stage_class_logits']:12.2e} "
              f"{diff['stage_mask_logits']:12.2e}   guard {'holds' if holds else 'FAILS'}")
    between = {field: relative_difference(getattr(outputs["sdpa"], field), getattr(outputs["eager"], field))
               for field in ("class_queries_logits", "masks_queries_logits")}
    print(f"sdpa against eager: class logits {between['class_queries_logits']:.2e}, "
          f"mask logits {between['masks_queries_logits']:.2e}")

    times = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(args.rounds):
        for name in IMPLEMENTATIONS:
            model.set_attn_implementation(name)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward(model, pixels, name)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    print(f"seconds per image (forward pass, batch 1, median of {args.rounds}; every round)")
    for name in IMPLEMENTATIONS:
        print(f"{name:>8} {statistics.median(times[name]):8.3f}   " + " ".join(f"{t:.3f}" for t in times[name]))


if __name__ == "__main__":
    main()
