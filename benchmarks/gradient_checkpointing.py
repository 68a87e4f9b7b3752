"""Peak memory of one training step with and without gradient checkpointing (decoder stages recomputed).

    OMP_NUM_THREADS=1 python benchmarks/gradient_checkpointing.py --variant r50 --size 512 --batch-size 2

Each setting runs in a fresh process (random weights, random targets, no download). On CUDA the figure is
`torch.cuda.max_memory_allocated` during the step; on CPU it is the rise of the process's peak resident memory
(`ru_maxrss`) during the step over what the model and inputs already hold. Also checks that the loss and the
gradients agree between the two settings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one_step(variant: str, size: int, batch_size: int, device: str, checkpointing: bool) -> dict:
    import torch

    from eovseg import EovSegConfig, EovSegForPanopticSegmentation

    torch.manual_seed(0)
    config = EovSegConfig.from_variant(variant)
    model = EovSegForPanopticSegmentation(config).to(device).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    num_classes, num_targets = 20, 8
    pixel_values = torch.randn(batch_size, 3, size, size, device=device)
    text = torch.nn.functional.normalize(torch.randn(num_classes, config.embed_dim, device=device), dim=-1)
    ids = torch.randint(0, num_targets, (batch_size, size // 16, size // 16), device=device)
    ids = ids.repeat_interleave(16, 1).repeat_interleave(16, 2)
    mask_labels = [torch.stack([(i == t).float() for t in range(num_targets)]) for i in ids]
    class_labels = [torch.randint(0, num_classes, (num_targets,), device=device) for _ in range(batch_size)]
    inputs = dict(
        pixel_values=pixel_values,
        text_embeddings=text,
        synonym_counts=torch.ones(num_classes, dtype=torch.long),
        mask_labels=mask_labels,
        class_labels=class_labels,
    )
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(1)
    loss = model(**inputs).loss
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    grads = [p.grad.double().square().sum().item() for p in model.parameters() if p.grad is not None]
    return {"peak_mib": peak / 2**20, "loss": loss.item(), "grad_norm": sum(grads) ** 0.5}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="r50")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = one_step(args.variant, args.size, args.batch_size, args.device, args.child == "on")
        print(json.dumps(result))
        return 0
    results = {}
    for setting in ("off", "on"):
        command = [sys.executable, __file__, "--variant", args.variant, "--size", str(args.size),
                   "--batch-size", str(args.batch_size), "--device", args.device, "--child", setting]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[setting] = json.loads(out.strip().splitlines()[-1])
    off, on = results["off"], results["on"]
    print(f"{args.variant}, {args.batch_size} x {args.size}x{args.size}, {args.device}")
    print(f"  without gradient checkpointing: peak +{off['peak_mib']:.0f} MiB, loss {off['loss']:.6f}")
    print(f"  with gradient checkpointing:    peak +{on['peak_mib']:.0f} MiB, loss {on['loss']:.6f}")
    print(f"  peak-memory drop: {off['peak_mib'] - on['peak_mib']:.0f} MiB ({1 - on['peak_mib'] / off['peak_mib']:.0%}); "
          f"gradient norms {off['grad_norm']:.6g} / {on['grad_norm']:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
