"""Compare eovseg with a numerical reference dump of the original EOV-Seg implementation.

    python benchmarks/compare_with_original.py ref_r50.pt [ref_r50x4.pt ...] [--through-folder]

A reference dump is a `torch.save`d dict made by running the original (detectron2) code with random weights:
`state_dict` (original key names), `pixel_values`, `vocabulary`, `train_vocabulary`, `is_thing`,
`prompt_token_ids`, `text_classifier`, `category_overlapping_mask`, `cnn_feats`, `vit_feats`, `neck_feats`,
`vas_feats`, `stage_class_logits`, `stage_mask_logits`, `out_vocab_logits`, `final_class_logits` and `config`
(with `variant`). `benchmarks/dump_original.py` makes one from a checkout of the original, which this repository
does not ship (point `EOVSEG_ORIGINAL` at it, see `benchmarks/original_eovseg.py`):

    python benchmarks/dump_original.py r50 ref_r50.pt --dtype float64

In float32, our text tower runs only up to the longest prompt (not 77 tokens), which changes the text embeddings by
round-off (~1e-7); the decoder's hard masks (sigmoid > 0.5) can amplify that in later stages. `--reference-text` feeds
the original's text embeddings to compare the image path alone.

The weights are converted with our conversion code (in memory, or through a saved folder with `--through-folder`)
and every intermediate is compared. The difference reported is the absolute one, divided by the reference tensor's
largest magnitude where that exceeds 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from eovseg import EovSegConfig, EovSegForPanopticSegmentation
from eovseg.auto_registration import save_model_folder
from eovseg.conversion_scripts.convert_original_checkpoint import convert, detect_variant
from eovseg.conversion_scripts.key_mapping import convert_original_state_dict
from eovseg.processing import EovSegProcessor


def difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    if ours.shape != reference.shape:
        raise AssertionError(f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}")
    scale = max(1.0, reference.abs().max().item())
    return (ours - reference).abs().max().item() / scale


def compare(path: str, through_folder: bool, tolerance: float, reference_text: bool = False) -> dict[str, float]:
    # memory-mapped: a float64 dump of the large variants is several GB; its pages are read as needed
    ref = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    state = ref["state_dict"]
    variant = ref.get("config", {}).get("variant") or detect_variant(state)
    dtype = ref["pixel_values"].dtype
    config = EovSegConfig.from_variant(
        variant, vocabulary=list(ref["vocabulary"]), is_thing=list(ref["is_thing"]),
        train_vocabulary=list(ref["train_vocabulary"]),
    )
    model, dropped = convert({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, config)
    processor = EovSegProcessor.from_config(config)
    text = processor.encode_vocabulary(config.vocabulary)
    model.set_default_vocabulary_embeddings(text["input_ids"])
    if through_folder:
        with tempfile.TemporaryDirectory() as folder:
            save_model_folder(model, processor, folder)
            model = EovSegForPanopticSegmentation.from_pretrained(folder)
            processor = EovSegProcessor.from_pretrained(folder)
    model = model.eval()
    # load the float64 reference weights exactly (the converted folder holds float32 copies)
    if dtype == torch.float64:
        model = model.double()
        model.load_state_dict(convert_original_state_dict(state)[0], strict=False)
    results = {}
    ids = text["input_ids"]
    ref_ids = ref["prompt_token_ids"]
    results["token ids (mismatching entries)"] = float(
        (ids != ref_ids[:, : ids.shape[1]]).sum().item() + (ref_ids[:, ids.shape[1]:] != 0).sum().item()
    )
    results["class_seen_mask (mismatches)"] = float(
        (text["class_seen_mask"].long() != ref["category_overlapping_mask"].long()).sum().item()
    )
    model._clear_text_cache()
    with torch.no_grad():
        embeddings = model.get_text_embeddings(ids)
        results["text embeddings"] = difference(embeddings, ref["text_classifier"])
        if reference_text:
            # the original's own text embeddings: isolates the image path from text-tower round-off
            vocabulary = {"text_embeddings": ref["text_classifier"].to(model.dtype),
                          "synonym_counts": text["synonym_counts"], "class_seen_mask": text["class_seen_mask"]}
        else:
            vocabulary = dict(text)
        outputs = model(ref["pixel_values"].to(model.dtype), **vocabulary, output_hidden_states=True)
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        results[f"backbone {name}"] = difference(outputs.backbone_hidden_states[i], ref["cnn_feats"][name])
    results["ViT first block"] = difference(outputs.spatial_hidden_state, ref["vit_feats"])
    results["neck"] = difference(outputs.aggregator_hidden_state, ref["neck_feats"])
    results["VAS"] = difference(outputs.vas_hidden_state, ref["vas_feats"])
    stages = zip(outputs.stage_class_queries_logits.unbind(1), outputs.stage_masks_queries_logits.unbind(1))
    for stage, (cls, mask) in enumerate(stages):
        results[f"stage {stage} class logits"] = difference(cls, ref["stage_class_logits"][stage])
        results[f"stage {stage} mask logits"] = difference(mask, ref["stage_mask_logits"][stage])
    results["out-of-vocabulary logits"] = difference(outputs.out_of_vocabulary_logits, ref["out_vocab_logits"])
    results["final ensembled class logits"] = difference(outputs.class_queries_logits, ref["final_class_logits"])
    print(f"\n{path}: variant {variant}, {str(dtype).replace('torch.', '')}, "
          f"{'through a saved folder' if through_folder else 'in memory'}, {len(dropped)} original keys dropped"
          + (", with the original's text embeddings" if reference_text else ""))
    worst = 0.0
    for name, value in results.items():
        flag = "" if value <= tolerance else "   <-- above tolerance"
        print(f"  {name:<34} {value:.3e}{flag}")
        if "mismatch" not in name:
            worst = max(worst, value)
    print(f"  largest difference: {worst:.3e}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("references", nargs="+")
    parser.add_argument("--through-folder", action="store_true", help="save and reload the converted model first")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--reference-text", action="store_true",
                        help="feed the original's text embeddings (isolates the image path from text round-off)")
    args = parser.parse_args(argv)
    failed = False
    for path in args.references:
        results = compare(path, args.through_folder, args.tolerance, args.reference_text)
        failed |= any(v > args.tolerance for k, v in results.items() if "mismatch" not in k)
        failed |= any(v > 0 for k, v in results.items() if "mismatch" in k)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
