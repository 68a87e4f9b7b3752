"""Time to encode a vocabulary with the CLIP text tower: ours (prompts cut at the longest one, chunked, cached) against
open_clip's own 77-token `encode_text`, on the same prompts, and check both give the same embeddings.

    python benchmarks/text_encoding.py --variant r50 --num-classes 150

The class names are made up (two or three synonyms of one to three words, like the ADE20K-150 prompt-engineered
vocabulary); weights are random, which does not change the cost.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from eovseg import EovSegConfig, EovSegForPanopticSegmentation
from eovseg.processing import EovSegProcessor
from eovseg.vocabulary import PROMPT_TEMPLATES

WORDS = ("wall building sky floor tree ceiling road bed window grass cabinet sidewalk person earth door table "
         "mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair seat fence "
         "desk rock wardrobe lamp bathtub railing cushion base box column signboard chest counter sand sink").split()


def make_vocabulary(num_classes: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocabulary = []
    while len(vocabulary) < num_classes:
        synonyms = [" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(rng.randint(2, 3))]
        entry = ", ".join(dict.fromkeys(synonyms))
        if entry not in vocabulary:
            vocabulary.append(entry)
    return vocabulary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="r50")
    parser.add_argument("--num-classes", type=int, default=150)
    args = parser.parse_args(argv)
    config = EovSegConfig.from_variant(args.variant)
    model = EovSegForPanopticSegmentation(config).eval()
    processor = EovSegProcessor.from_config(config)
    vocabulary = make_vocabulary(args.num_classes)
    ids = processor.encode_vocabulary(vocabulary)["input_ids"]
    print(f"{args.variant}: {len(vocabulary)} classes, {ids.shape[0]} prompts, longest {ids.shape[1]} tokens, "
          f"{torch.get_num_threads()} threads")

    start = time.perf_counter()
    ours = model.get_text_embeddings(ids)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.get_text_embeddings(ids)
    cached = time.perf_counter() - start

    clip = model.clip_backbone.clip_model
    padded = F.pad(ids, (0, 77 - ids.shape[1]))
    start = time.perf_counter()
    with torch.no_grad():
        full = torch.cat([F.normalize(clip.encode_text(chunk), dim=-1) for chunk in padded.split(128)])
    full_time = time.perf_counter() - start
    full = F.normalize(full.reshape(-1, len(PROMPT_TEMPLATES), full.shape[-1]).mean(1), dim=-1)
    print(f"  77-token encode_text (open_clip):  {full_time:8.2f} s")
    print(f"  ours, first call:                  {first:8.2f} s  ({full_time / first:.1f}x faster)")
    print(f"  ours, same vocabulary again:       {cached * 1000:8.2f} ms (cache hit, no text pass)")
    print(f"  max |difference| of the embeddings: {(ours - full).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
