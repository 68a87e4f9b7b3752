"""Run the original EOV-Seg (detectron2 code) on random weights and save the reference dump that
`benchmarks/compare_with_original.py` compares eovseg with.

    export EOVSEG_ORIGINAL=/path/EOV-Seg:/path/detectron2:/path/pydeps   # see benchmarks/original_eovseg.py
    python benchmarks/dump_original.py r50 ref_r50_float64.pt --dtype float64
    python benchmarks/dump_original.py convnext_l ref_convnext_l_float32.pt --dtype float32

The original model of the variant is built from its released config; every floating-point tensor of its state dict
(its own initial values) is then perturbed with seeded noise, so that no weight, bias, norm or running statistic
keeps a trivial value (zero or one) that would hide a swapped or missing term. The weights are drawn in float32 and
cast to `--dtype`, so the float32 and float64 dumps of one seed hold the same weights. The input is the guard
fixture's photo resized to `--size` (PIL bilinear); the vocabulary is `--classes` of ADE20K-150 (with their synonyms)
against the COCO panoptic training vocabulary, so that some classes are seen and some are not.

Intermediates are captured with forward hooks on the original's modules (CNN CLIP tower, ViT block, neck, VAS, each
decoder stage) and by wrapping the two functions whose results no module returns (the CLIP branch's classification
and the panoptic inference, which receives the final ensembled class logits). Nothing of the original is copied:
it is imported from `EOVSEG_ORIGINAL`. The dump is written only when the run has succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from original_eovseg import VARIANT_CONFIGS, OriginalUnavailable, build_original  # noqa: E402

from eovseg.vocabularies import get_vocabulary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = ROOT / "tests" / "fixtures" / "original-r50" / "coffee.png"
# a dozen ADE20K-150 classes, one to twelve synonyms each: seen in COCO panoptic (stuff wall, sky, road; things
# person, chair, car) and unseen (stuff earth, house exterior, field; things painting, armchair, box)
DEFAULT_CLASSES = "0,2,6,12,19,20,13,25,29,22,30,41"


def _noise_generator(key: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(key.encode()))


def perturbed(key: str, tensor: torch.Tensor, seed: int) -> torch.Tensor:
    """The original's initial value of one tensor plus seeded noise of its own scale (float32)."""
    value = tensor.detach().float()
    noise = torch.randn(value.shape, generator=_noise_generator(key, seed))
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_var":  # stays positive
        return value * torch.exp(0.2 * noise)
    spread = value.std().item() if value.numel() > 1 else 0.0
    if spread > 0:
        return value + 0.25 * spread * noise
    level = value.abs().max().item() if value.numel() else 0.0
    if level > 0:  # constant, e.g. norm weights, VAS scale, logit scales
        return value + 0.1 * level * noise
    if value.dim() >= 2:  # zero-initialised weights (the deformable offsets): offsets of about a pixel
        return 0.3 * noise / max(1, value[0].numel()) ** 0.5
    return 0.05 * noise  # zero-initialised biases and shifts


@torch.no_grad()
def perturb_weights(model, seed: int) -> None:
    """Every floating-point tensor of the state dict perturbed in place (one tensor's copy at a time in memory)."""
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            tensor.copy_(perturbed(key, tensor, seed))


class Recorder:
    """Forward hooks (and two wrapped functions) that keep what the original computes on the way."""

    def __init__(self, model):
        self.model = model
        self.values: dict = {"stage_class_logits": [], "stage_mask_logits": [], "final_class_logits": []}
        self.handles = []

    def _keep(self, name):
        def hook(module, inputs, output):
            self.values[name] = output
        return hook

    def _keep_stage(self, module, inputs, output):
        class_logits, mask_logits, _ = output
        self.values["stage_class_logits"].append(class_logits)
        self.values["stage_mask_logits"].append(mask_logits)

    def _keep_pixels(self, module, inputs):
        self.values["pixel_values"] = inputs[0]

    @contextlib.contextmanager
    def recording(self):
        model = self.model
        self.handles = [
            model.cnn_backbone.register_forward_pre_hook(self._keep_pixels),
            model.cnn_backbone.register_forward_hook(self._keep("cnn_feats")),
            model.vit_backbone.register_forward_hook(self._keep("vit_feats")),
            model.lite_aggr.register_forward_hook(self._keep("neck_feats")),
            model.light_weight_decoder.vas.register_forward_hook(self._keep("vas_feats")),
        ] + [head.register_forward_hook(self._keep_stage) for head in model.light_weight_decoder.mask_heads]
        segmentator = sys.modules[type(model).__module__]
        classify, panoptic = segmentator.get_classification_logits, model.panoptic_inference

        def out_vocab_classification(*args, **kwargs):  # the meta-architecture calls it once: the CLIP branch
            self.values["out_vocab_logits"] = classify(*args, **kwargs)
            return self.values["out_vocab_logits"]

        def panoptic_inference(mask_cls, mask_pred):  # receives each image's final class logits
            self.values["final_class_logits"].append(mask_cls)
            return panoptic(mask_cls, mask_pred)

        segmentator.get_classification_logits = out_vocab_classification
        model.panoptic_inference = panoptic_inference
        try:
            yield self.values
        finally:
            segmentator.get_classification_logits = classify
            del model.panoptic_inference
            for handle in self.handles:
                handle.remove()


def vocabulary_of(indices: list[int]):
    test = get_vocabulary("ade20k_150")
    train = get_vocabulary("coco_panoptic")
    return [test.class_names[i] for i in indices], [test.is_thing[i] for i in indices], list(train.class_names)


def set_vocabulary(model, vocabulary: list[str], is_thing: list[bool], train_vocabulary: list[str], tag: str):
    """Give the original model our vocabulary through detectron2's metadata, as its own data sets do."""
    from detectron2.data import MetadataCatalog

    train = MetadataCatalog.get(f"eovseg_dump_train_{tag}")
    train.set(stuff_classes=train_vocabulary, thing_classes=train_vocabulary)
    test = MetadataCatalog.get(f"eovseg_dump_test_{tag}")
    things = [i for i, thing in enumerate(is_thing) if thing]
    test.set(stuff_classes=vocabulary, thing_classes=vocabulary,
             thing_dataset_id_to_contiguous_id={i: i for i in things})
    model.train_metadata = train
    model.set_metadata(test)  # recomputes the seen mask against train_metadata


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    if not path.is_file():
        raise SystemExit(f"--image {path}: no such file.")
    height, width = size
    image = Image.open(path).convert("RGB").resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def run_original(model, image: torch.Tensor, dtype: torch.dtype) -> dict:
    recorder = Recorder(model)
    with recorder.recording() as values, torch.no_grad():
        model([{"image": image.to(dtype), "height": image.shape[-2], "width": image.shape[-1]}])
    values["cnn_feats"] = {name: values["cnn_feats"][name] for name in ("res2", "res3", "res4", "res5")}
    values["final_class_logits"] = torch.stack(values["final_class_logits"])
    return values


def make_dump(args) -> dict:
    dtype = getattr(torch, args.dtype)
    vocabulary, is_thing, train_vocabulary = vocabulary_of(args.classes)
    image = load_image(args.image, args.size)
    torch.manual_seed(args.seed)  # the original's own initial weights, under the perturbation, are seeded too
    try:
        model = build_original(args.variant)
    except OriginalUnavailable as error:
        raise SystemExit(str(error))
    perturb_weights(model, args.seed)
    model = model.to(dtype).eval()
    set_vocabulary(model, vocabulary, is_thing, train_vocabulary, f"{args.variant}_{args.seed}")
    values = run_original(model, image, dtype)
    state_dict = {key: tensor.detach() for key, tensor in model.state_dict().items()}  # the model is done with
    return {
        "state_dict": state_dict,
        "pixel_values": values["pixel_values"],
        "vocabulary": vocabulary,
        "train_vocabulary": train_vocabulary,
        "is_thing": is_thing,
        "prompt_token_ids": model.cnn_backbone.tokenize_text(model.test_class_names),
        "text_classifier": model.test_text_classifier,
        "category_overlapping_mask": model.category_overlapping_mask,
        **{key: values[key] for key in (
            "cnn_feats", "vit_feats", "neck_feats", "vas_feats", "stage_class_logits", "stage_mask_logits",
            "out_vocab_logits", "final_class_logits")},
        "config": {"variant": args.variant, "dtype": args.dtype, "seed": args.seed, "image": args.image.name,
                   "size": list(args.size), "classes": args.classes, "config_file": VARIANT_CONFIGS[args.variant]},
    }


def summary(dump: dict) -> str:
    """How lively the random network is: masks neither all on nor all off, seen and unseen classes."""
    positive = [f"{(m > 0).double().mean().item():.2f}" for m in dump["stage_mask_logits"]]
    seen = int(dump["category_overlapping_mask"].sum())
    return (f"{len(dump['vocabulary'])} classes ({seen} seen), {dump['text_classifier'].shape[0]} synonyms, "
            f"pixel_values {tuple(dump['pixel_values'].shape)}, positive mask logits per stage {', '.join(positive)}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANT_CONFIGS))
    parser.add_argument("output", type=Path, help="the dump to write (a new file)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 384], metavar=("HEIGHT", "WIDTH"),
                        help="input size, each a multiple of 32 (no padding)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--classes", default=DEFAULT_CLASSES, help="comma-separated ADE20K-150 class indices")
    args = parser.parse_args(argv)
    if any(side <= 0 or side % 32 for side in args.size):
        parser.error(f"--size {args.size[0]} {args.size[1]}: each side must be a positive multiple of 32.")
    try:
        args.classes = [int(i) for i in args.classes.split(",")]
    except ValueError:
        parser.error(f"--classes {args.classes!r}: expected comma-separated integers.")
    if not all(0 <= i < 150 for i in args.classes) or len(set(args.classes)) != len(args.classes):
        parser.error("--classes: expected distinct ADE20K-150 indices in 0..149.")
    if args.output.exists():
        parser.error(f"{args.output} exists: give a new file name (a dump is never overwritten).")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    dump = make_dump(args)
    partial = args.output.with_name(f".{args.output.name}.partial")
    torch.save(dump, partial)  # then renamed: a failed save leaves no half-written dump under the asked name
    os.replace(partial, args.output)
    print(f"{args.output}: {args.variant} {args.dtype}, {summary(dump)}, "
          f"{time.perf_counter() - start:.0f} s with {torch.get_num_threads()} threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
