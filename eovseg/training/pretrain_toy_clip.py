"""Pretrain the toy CLIP: the `tiny` preset's CLIP towers trained on the toy world's image-caption pairs.

    OMP_NUM_THREADS=1 python -m eovseg.training.pretrain_toy_clip --output_dir runs/toy_clip --steps 1500 --seed 0

EOV-Seg's open vocabulary rests on a CLIP that saw every concept in image-text pairs. This builds the same open_clip
towers the model's preset builds (the ResNet CLIP, vision and text, from `clip_model_config`; the ViT CLIP from
`vit_model_config`, of which EOV-Seg keeps the first block) and trains them from random weights with open_clip's
contrastive `ClipLoss` on pairs covering every class of the toy world, seen and unseen ([`eovseg.synthetic`]):

* whole scenes (`--scene_size` pixels, all 18 classes) captioned with the names of what they show;
* close-ups of one class (a thing over some stuff, or a stuff type alone; `--crop_size` pixels) captioned with one of
  EOV-Seg's prompt templates filled with its name, one close-up per class in each of two groups per step (no two
  pictures of the same class are negatives of each other).

The ResNet tower's image embedding is taken the way EOV-Seg's out-of-vocabulary branch takes a mask's: CLIP's
attention pooling over the dense features ([`EovSegOutOfVocabularyEmbedder`], here with the whole picture as the
mask, which also interpolates the positional embedding to any picture size). Captions are tokenized with the project's
CLIP tokenizer. At the end it prints retrieval accuracies on new pictures (each close-up against the 18 class names;
each ground-truth segment of new scenes, mask-pooled as EOV-Seg pools a predicted mask, against the 18 names) and
saves, into `--output_dir`, an EOV-Seg `tiny` model (random decoder) holding the pretrained towers, with its processor:
the starting point of `python -m eovseg.training.train --model OUTPUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..command_line import non_negative_int, positive_float, positive_int, run_command
from ..inputs import rgb_to_id

__all__ = ["build_parser", "pretrain", "retrieval_accuracy", "tower_state_dict"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eovseg.training.pretrain_toy_clip",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="where the EOV-Seg model with the pretrained towers is saved")
    # the ResNet CLIP's attention pooling is what the picture embedding goes through (a ConvNeXt CLIP has none)
    p.add_argument("--preset", default="tiny", choices=["tiny"], help="the EOV-Seg preset whose towers are pretrained")
    p.add_argument("--steps", type=positive_int, default=1500)
    p.add_argument("--scenes_per_step", type=positive_int, default=24)
    p.add_argument("--scene_pool", type=positive_int, default=3000, help="distinct scenes drawn before training")
    p.add_argument("--scene_size", type=positive_int, default=128)
    p.add_argument("--crop_size", type=positive_int, default=64)
    p.add_argument("--learning_rate", type=positive_float, default=2e-3)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--log_every", type=positive_int, default=100)
    p.add_argument("--retrieval_scenes", type=positive_int, default=100, help="new scenes of the final retrieval check")
    return p


def normalize(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, with the model's pixel statistics."""
    from ..configuration_eovseg import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD

    x = torch.from_numpy(np.array(images, dtype=np.float32)).permute(0, 3, 1, 2)
    return (x - torch.tensor(IMAGENET_PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_PIXEL_STD).view(1, 3, 1, 1)


def resnet_dense(backbone, pixel_values: torch.Tensor) -> torch.Tensor:
    """The dense CLIP features EOV-Seg's out-of-vocabulary branch pools (the last ResNet stage)."""
    return backbone(pixel_values)["clip_dense"]


def pooled_embedding(backbone, dense: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """EOV-Seg's mask embedding (B, Q, D) of masks (B, Q, H, W) given as logits (> 0 inside)."""
    return backbone.out_of_vocabulary._masked_attention_pool(backbone.clip_model.visual.attnpool, dense, masks)


def image_embedding(backbone, pixel_values: torch.Tensor) -> torch.Tensor:
    """The whole picture's embedding through the out-of-vocabulary branch's pooling."""
    dense = resnet_dense(backbone, pixel_values)
    whole = torch.ones(dense.shape[0], 1, *dense.shape[-2:])
    return pooled_embedding(backbone, dense, whole)[:, 0]


class ToyPairs:
    """The image-caption pairs: a pool of scenes and close-ups drawn on demand, with tokenized captions."""

    def __init__(self, tokenizer, scene_pool: int, scene_size: int, crop_size: int, seed: int):
        from ..synthetic import TOY_CLASSES, make_toy_world_dataset
        from ..vocabulary import PROMPT_TEMPLATES
        from ..processing.tokenization_eovseg import clip_tokenize

        scenes = make_toy_world_dataset(scene_pool, scene_size, seed=seed, split="all")
        self.scenes = np.stack([np.asarray(im) for im in scenes["image"]])
        self.scene_tokens = clip_tokenize(tokenizer, list(scenes["caption"]))
        prompts = [t.format(name) for name in TOY_CLASSES for t in PROMPT_TEMPLATES]
        self.prompt_tokens = clip_tokenize(tokenizer, prompts).view(len(TOY_CLASSES), len(PROMPT_TEMPLATES), -1)
        self.crop_size = crop_size
        self.rng = np.random.default_rng([seed, 1])

    def crops(self):
        """One close-up per class (in class order) and a random template's tokens for each."""
        from ..synthetic import TOY_CLASSES, toy_world_crop

        images = np.stack([toy_world_crop(name, self.rng, self.crop_size) for name in TOY_CLASSES])
        templates = self.rng.integers(self.prompt_tokens.shape[1], size=len(TOY_CLASSES))
        return normalize(images), self.prompt_tokens[torch.arange(len(TOY_CLASSES)), torch.from_numpy(templates)]

    def scene_batch(self, count: int):
        rows = self.rng.choice(len(self.scenes), size=count, replace=False)
        return self.scenes[rows], self.scene_tokens[torch.from_numpy(rows)]


def build_towers(preset: str):
    """The preset's ResNet CLIP (as EOV-Seg's backbone module, trainable) and its full ViT CLIP (open_clip)."""
    import open_clip

    from ..configuration_eovseg import EovSegConfig
    from ..modeling_eovseg import EovSegClipBackbone

    config = EovSegConfig.from_variant(preset)
    backbone = EovSegClipBackbone(config)
    backbone.requires_grad_(True)
    vit_cfg = dict(config.vit_model_config)
    vit = open_clip.model.CLIP(embed_dim=vit_cfg["embed_dim"], vision_cfg=dict(vit_cfg["vision_cfg"]),
                               text_cfg=dict(vit_cfg["text_cfg"]), quick_gelu=bool(vit_cfg.get("quick_gelu", False)))
    return config, backbone, vit


def set_backbone_training(backbone, mode: bool) -> None:
    """EovSegClipBackbone keeps its batch norms in eval mode (frozen in EOV-Seg); pretraining needs batch statistics."""
    torch.nn.Module.train(backbone, mode)


def pretrain(args) -> dict:
    from open_clip.loss import ClipLoss

    from ..processing.tokenization_eovseg import build_clip_tokenizer

    torch.manual_seed(args.seed)
    config, backbone, vit = build_towers(args.preset)
    tokenizer = build_clip_tokenizer()
    start = time.time()
    pairs = ToyPairs(tokenizer, args.scene_pool, args.scene_size, args.crop_size, args.seed)
    print(json.dumps({"pairs_drawn_seconds": round(time.time() - start, 1)}), flush=True)
    vit_size = config.vit_model_config["vision_cfg"]["image_size"]
    params = [p for p in list(backbone.parameters()) + list(vit.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine decay to 0
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + np.cos(np.pi * min(1.0, s / args.steps)))))
    loss_fn = ClipLoss()
    set_backbone_training(backbone, True)
    vit.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        groups = [pairs.crops(), pairs.crops()]
        scenes, scene_tokens = pairs.scene_batch(args.scenes_per_step)
        loss = 0.0
        for images, tokens in groups:
            loss = loss + _pair_loss(loss_fn, image_embedding(backbone, images), backbone.encode_text(tokens),
                                     backbone.clip_model.logit_scale)
            loss = loss + _pair_loss(loss_fn, vit.encode_image(_resize(images, vit_size)), vit.encode_text(tokens),
                                     vit.logit_scale)
        scene_pixels = normalize(scenes)
        loss = loss + _pair_loss(loss_fn, image_embedding(backbone, scene_pixels), backbone.encode_text(scene_tokens),
                                 backbone.clip_model.logit_scale)
        loss = loss + _pair_loss(loss_fn, vit.encode_image(_resize(scene_pixels, vit_size)),
                                 vit.encode_text(scene_tokens), vit.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # CLIP's clamp of the learnt temperature (at most 100)
            backbone.clip_model.logit_scale.clamp_(0, np.log(100))
            vit.logit_scale.clamp_(0, np.log(100))
        if step % args.log_every == 0 or step == args.steps:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start)}),
                  flush=True)
    set_backbone_training(backbone, False)
    vit.eval()
    accuracy = retrieval_accuracy(backbone, tokenizer, args.scene_size, args.crop_size, seed=args.seed + 1000,
                                  num_scenes=args.retrieval_scenes)
    print(json.dumps({"retrieval": accuracy, "train_seconds": round(time.time() - start)}), flush=True)
    save_init_model(config, backbone, vit, args.output_dir)
    return accuracy


def _resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    if pixels.shape[-1] == size:
        return pixels
    return torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _pair_loss(loss_fn, image_features, text_features, logit_scale):
    image_features = torch.nn.functional.normalize(image_features, dim=-1)
    text_features = torch.nn.functional.normalize(text_features, dim=-1)
    return loss_fn(image_features, text_features, logit_scale.exp())


@torch.no_grad()
def class_text_embeddings(backbone, tokenizer, names) -> torch.Tensor:
    """(K, D) normalized text embeddings of class names, averaged over EOV-Seg's prompt templates."""
    from ..processing.tokenization_eovseg import clip_tokenize
    from ..vocabulary import PROMPT_TEMPLATES

    tokens = clip_tokenize(tokenizer, [t.format(n) for n in names for t in PROMPT_TEMPLATES])
    text = torch.nn.functional.normalize(backbone.encode_text(tokens), dim=-1).view(len(names), len(PROMPT_TEMPLATES), -1)
    return torch.nn.functional.normalize(text.mean(1), dim=-1)


@torch.no_grad()
def retrieval_accuracy(backbone, tokenizer, scene_size: int = 128, crop_size: int = 64, seed: int = 1000,
                       num_scenes: int = 100) -> dict:
    """Top-1 accuracy (percent) of naming, among the 18 class names: new close-ups (5 per class), and the
    ground-truth segments of `num_scenes` new scenes mask-pooled as EOV-Seg pools a mask; each for the seen and the
    unseen classes."""
    from ..synthetic import TOY_CLASSES, TOY_UNSEEN_CLASSES, make_toy_world_dataset, toy_world_crop

    text = class_text_embeddings(backbone, tokenizer, TOY_CLASSES)
    rng = np.random.default_rng([seed, 2])
    truth = np.repeat(np.arange(len(TOY_CLASSES)), 5)
    crops = np.stack([toy_world_crop(TOY_CLASSES[k], rng, crop_size) for k in truth])
    crop_pred = (torch.nn.functional.normalize(image_embedding(backbone, normalize(crops)), dim=-1) @ text.T).argmax(1)
    scenes = make_toy_world_dataset(num_scenes, scene_size, seed=seed, split="all")
    seg_truth, seg_pred = [], []
    for row in scenes:
        ids = rgb_to_id(np.asarray(row["label"]))
        masks = torch.from_numpy(np.stack([ids == s["id"] for s in row["segments_info"]])).float()[None] * 2 - 1
        dense = resnet_dense(backbone, normalize(np.asarray(row["image"])[None]))
        embedded = torch.nn.functional.normalize(pooled_embedding(backbone, dense, masks)[0], dim=-1)
        seg_pred += (embedded @ text.T).argmax(1).tolist()
        seg_truth += [s["category_id"] for s in row["segments_info"]]
    unseen = {TOY_CLASSES.index(n) for n in TOY_UNSEEN_CLASSES}

    def accuracy(truths, preds, want_unseen):
        pairs = [(t, p) for t, p in zip(truths, preds) if (t in unseen) == want_unseen]
        return round(100.0 * sum(t == p for t, p in pairs) / max(1, len(pairs)), 1)

    crop_pred = crop_pred.tolist()
    return {
        "closeups_seen": accuracy(truth.tolist(), crop_pred, False),
        "closeups_unseen": accuracy(truth.tolist(), crop_pred, True),
        "segments_seen": accuracy(seg_truth, seg_pred, False),
        "segments_unseen": accuracy(seg_truth, seg_pred, True),
    }


def tower_state_dict(backbone, vit) -> dict:
    """The towers' weights under the EOV-Seg model's names (`clip_backbone.*`, `spatial_extractor.*`)."""
    state = {f"clip_backbone.{k}": v for k, v in backbone.state_dict().items()}
    visual = vit.visual
    for name in ("class_embedding", "positional_embedding"):
        state[f"spatial_extractor.{name}"] = getattr(visual, name).detach()
    state["spatial_extractor.conv1.weight"] = visual.conv1.weight.detach()
    for k, v in visual.ln_pre.state_dict().items():
        state[f"spatial_extractor.ln_pre.{k}"] = v
    for k, v in visual.transformer.resblocks[0].state_dict().items():
        state[f"spatial_extractor.block.{k}"] = v
    return state


def save_init_model(config, backbone, vit, output_dir) -> None:
    """An EOV-Seg model of the preset (random decoder) with the pretrained towers, and its processor."""
    from ..auto_registration import save_model_folder_atomically
    from ..modeling_eovseg import EovSegForPanopticSegmentation
    from ..processing import EovSegProcessor
    from ..synthetic import TOY_SEEN_CLASSES

    torch.manual_seed(0)
    # panoptic training on the seen split adds its classes to this list: start it with exactly those (the preset's
    # own training vocabulary names classes of another world)
    config.train_vocabulary = list(TOY_SEEN_CLASSES)
    model = EovSegForPanopticSegmentation(config)
    towers = tower_state_dict(backbone, vit)
    missing, unexpected = model.load_state_dict(towers, strict=False)
    tower_missing = [k for k in missing if k.startswith(("clip_backbone.", "spatial_extractor."))]
    if unexpected or tower_missing:
        raise RuntimeError(f"tower weights do not fit the model: missing {tower_missing}, unexpected {unexpected}")
    model.freeze_clip_towers()
    processor = EovSegProcessor.from_config(config)
    processor.train_vocabulary = list(TOY_SEEN_CLASSES)
    save_model_folder_atomically(model, processor, output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0, 1 for bad input (one line), 2 for a usage error."""
    return run_command(lambda args: pretrain(build_parser().parse_args(args)), argv,
                       prog="python -m eovseg.training.pretrain_toy_clip")

if __name__ == "__main__":
    sys.exit(main())
