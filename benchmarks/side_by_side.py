"""The original EOV-Seg and ours, side by side in one run: images per second (alternating A B A B), per-component
times, peak memory, batch 1 and 8, the first call with a new vocabulary, and cost against vocabulary size.

    export EOVSEG_ORIGINAL=/path/EOV-Seg:/path/detectron2:/path/pydeps   # see benchmarks/original_eovseg.py
    python benchmarks/side_by_side.py images --fixture tests/fixtures/original-r50 --rounds 3
    python benchmarks/side_by_side.py images --no-original --compile      # ours only, with torch.compile
    python benchmarks/side_by_side.py text --fixture tests/fixtures/original-r50
    python benchmarks/side_by_side.py vocabularies --vocabulary-dir eovseg/vocabularies
    python benchmarks/side_by_side.py memory --fixture tests/fixtures/original-r50

Both models get the same deterministic R50 weights (the fixture's `refweights.py`; ours converted by our conversion
code), the fixture's image resized to 640x960, the ADE20K-150 vocabulary with synonyms (text embeddings cached, as a
server holds them), and return panoptic results at the image's 400x600 size: model forward plus panoptic
post-processing. Each variant runs in its own process (allocator state is per process; ours reuses freed memory on
CPU, see `eovseg/cpu_memory.py`, and the row "original, freed memory reused" gives the original the same setting).
Each round runs every variant once, in turn, so machine load hits all alike; the table gives the median over rounds
and every round's figure. Peak memory is measured in a fresh process per variant (the growth of
the resident set over the loaded model during one call). Set `OMP_NUM_THREADS` / `--threads` to what you compare.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import ComponentTimer  # noqa: E402
from original_eovseg import OriginalUnavailable, build_original_r50  # noqa: E402

from eovseg import EovSegConfig  # noqa: E402
from eovseg.conversion_scripts.convert_original_checkpoint import convert  # noqa: E402
from eovseg.cpu_memory import reuse_freed_memory  # noqa: E402
from eovseg.processing import EovSegProcessor  # noqa: E402

ORIGINAL_COMPONENTS = {
    "backbone": "cnn_backbone",
    "vit_block": "vit_backbone",
    "neck": "lite_aggr",
    "decoder": "light_weight_decoder",
}
TARGET_SIZE = (400, 600)


def check_fixture(folder: str) -> Path:
    folder = Path(folder)
    if not (folder / "refweights.py").is_file():
        raise SystemExit(f"--fixture {folder}: no refweights.py there (the original-r50 fixture folder).")
    return folder


class Fixture:
    """Weights, image and vocabulary of the original-R50 fixture."""

    def __init__(self, folder: str):
        folder = check_fixture(folder)
        sys.path.insert(0, str(folder))
        from refweights import make_state_dict

        manifest = json.loads((folder / "manifest.json").read_text())
        self.state_dict = make_state_dict(manifest, 0, torch.load(folder / "overrides.pt", weights_only=True))
        self.expected = torch.load(folder / "expected.pt", weights_only=True)
        height, width = self.expected["resized_shape"][:2]
        image = Image.open(folder / "coffee.png").convert("RGB").resize((width, height), Image.BILINEAR)
        self.image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
        things = set(self.expected["thing_contiguous_ids"])
        self.vocabulary = list(self.expected["test_class_names"])
        self.is_thing = [i in things for i in range(len(self.vocabulary))]
        self.train_vocabulary = list(self.expected["train_class_names"])


class Ours:
    def __init__(self, fixture: Fixture, dtype: torch.dtype, device: torch.device, compile_model: bool = False,
                 vocabulary: list[str] | None = None, is_thing: list[bool] | None = None, **config_kwargs):
        vocabulary = vocabulary or fixture.vocabulary
        config = EovSegConfig.from_variant("r50", vocabulary=vocabulary, is_thing=is_thing or fixture.is_thing,
                                           train_vocabulary=fixture.train_vocabulary, **config_kwargs)
        model, _ = convert(fixture.state_dict, config)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = EovSegProcessor.from_config(config)
        text = self.processor.encode_vocabulary(vocabulary)
        self.input_ids = text["input_ids"]
        start = time.perf_counter()
        embeddings = self.model.get_text_embeddings(self.input_ids)
        self.text_seconds = time.perf_counter() - start  # the vocabulary's first text pass, in the model's precision
        self.vocabulary = dict(text_embeddings=embeddings,
                               synonym_counts=text["synonym_counts"], class_seen_mask=text["class_seen_mask"])
        self.stuff = [i for i, thing in enumerate(config.is_thing) if not thing]
        mean = torch.tensor(fixture.expected["pixel_mean"]).view(3, 1, 1)
        std = torch.tensor(fixture.expected["pixel_std"]).view(3, 1, 1)
        self.pixels = ((fixture.image - mean) / std).to(device=device, dtype=dtype)[None]
        self.device = device
        self.timer = ComponentTimer(self.model, device)
        self.forward = torch.compile(self.model) if compile_model else self.model

    def __call__(self, batch: int):
        outputs = self.forward(self.pixels.expand(batch, -1, -1, -1).contiguous(), **self.vocabulary)
        return self.processor.image_processor.post_process_panoptic_segmentation(
            outputs, label_ids_to_fuse=self.stuff, target_sizes=[TARGET_SIZE] * batch)


class Original:
    def __init__(self, fixture: Fixture):
        self.model = build_original_r50(fixture.state_dict)
        self.model.test_text_classifier = fixture.expected["text_classifier"].clone()  # cached text, as ours
        self.image = fixture.image
        self.device = torch.device("cpu")
        self.timer = ComponentTimer(self.model, self.device, ORIGINAL_COMPONENTS)

    def __call__(self, batch: int):
        return self.model([{"image": self.image, "height": TARGET_SIZE[0], "width": TARGET_SIZE[1]}] * batch)


def variant_names(args) -> list[str]:
    names = [] if args.no_original else ["original", "original, freed memory reused"]
    names += ["ours float32", "ours bfloat16"]
    if args.device.startswith("cuda"):
        names.append("ours float16")
    if args.compile:
        names.append("ours float32 compiled")
    return names


def build_variant(name: str, fixture: Fixture, device: torch.device, **ours_kwargs):
    """A variant by its row name; `ours_kwargs` (vocabulary, is_thing) go to ours."""
    if name.startswith("original"):
        if name == "original, freed memory reused":
            reuse_freed_memory()  # the setting our model applies to its own process at its first CPU call
        return Original(fixture)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name.split()[1]]
    return Ours(fixture, dtype, device, compile_model=name.endswith("compiled"), **ours_kwargs)


def timed_call(variant, batch: int) -> float:
    sync = torch.cuda.synchronize if variant.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        variant(batch)
        sync()
    return time.perf_counter() - start


def variant_process(name: str, args, connection):
    """One variant in its own process (malloc settings and caches are per process), timing calls on request."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        variant = build_variant(name, Fixture(args.fixture), torch.device(args.device))
    except OriginalUnavailable as error:
        connection.send(("error", f"{error}\n(or pass --no-original to time ours alone)"))
        return
    except (SystemExit, Exception) as error:  # a bad --fixture, ...: one line in the parent, not a traceback
        connection.send(("error", f"{name}: {error}"))
        return
    connection.send(("ready", None))
    while (batch := connection.recv()) is not None:
        variant.timer.reset()
        seconds = timed_call(variant, batch)
        connection.send((seconds, dict(variant.timer.times)))


class VariantProcess:
    def __init__(self, name: str, args):
        self.name = name
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=variant_process, args=(name, args, child), daemon=True)
        self.process.start()

    def _receive(self):
        try:
            return self.connection.recv()
        except EOFError:  # killed (out of memory, ...)
            self.process.join()
            raise SystemExit(f"the process of {self.name!r} ended (exit code {self.process.exitcode}).") from None

    def wait_ready(self):
        status, message = self._receive()
        if status == "error":
            raise SystemExit(message)

    def __call__(self, batch: int):
        self.connection.send(batch)
        return self._receive()

    def close(self):
        self.connection.send(None)
        self.process.join()


def run_images(args):
    """Each variant runs in its own process, the parent asking them in turn (one at a time): the original's process
    keeps glibc's malloc settings, as where its users run it, while ours applies its freed-memory reuse
    (`eovseg.cpu_memory`); the row "original, freed memory reused" gives the original that same setting."""
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {name: VariantProcess(name, args) for name in variant_names(args)}
    for variant in variants.values():
        variant.wait_ready()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, one process per variant, "
          f"load average before: {os.getloadavg()}")
    for batch in args.batch_sizes:
        for name, variant in variants.items():  # warm-up (and compilation) outside the rounds
            print(f"  warm-up {name} batch {batch}: {variant(batch)[0]:.1f} s")
        times = {name: [] for name in variants}
        components = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, variant in variants.items():
                seconds, parts = variant(batch)
                times[name].append(seconds / batch)
                components[name].append(parts)
        report(batch, times, components, overlapped_vit=args.device == "cpu" and torch.get_num_threads() > 1)
    for variant in variants.values():
        variant.close()
    print(f"load average after: {os.getloadavg()}")


def report(batch: int, times: dict, components: dict, overlapped_vit: bool = False):
    print(f"\n== batch {batch}: seconds per image (median of {len(next(iter(times.values())))} alternating rounds; "
          f"every round in brackets) ==")
    reference = statistics.median(times["original"]) if "original" in times else None
    for name, values in times.items():
        median = statistics.median(values)
        ratio = f"  {reference / median:5.2f}x the original's images/s" if reference else ""
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {name:<24} {median:7.3f} s  ({1 / median:5.2f} images/s) [{rounds}]{ratio}")
    print("  per component (median s per image; the rest is CLIP branch, ensemble and post-processing):")
    if overlapped_vit:
        print("  (ours runs the ViT block beside the neck on CPU: its time overlaps the neck's and is not subtracted)")
    for name, rounds in components.items():
        keys = rounds[0].keys()
        parts = {k: statistics.median(r[k] for r in rounds) / batch for k in keys}
        beside = {"vit_block"} if overlapped_vit and name.startswith("ours") else set()
        rest = statistics.median(times[name]) - sum(v for k, v in parts.items() if k not in beside)
        print(f"    {name:<22} " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()) + f"  rest {rest:.3f}")


# ------------------------------------------------------------------------------------------------ text encoding


def cosine_to(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row to the same row of `reference`, in float64."""
    return torch.nn.functional.cosine_similarity(embeddings.double(), reference.double(), dim=-1)


def run_text(args):
    fixture = Fixture(args.fixture)
    ours = Ours(fixture, torch.float32, torch.device("cpu"))  # its first text pass is the float32 figure
    model, ids, float32 = ours.model, ours.input_ids, ours.vocabulary["text_embeddings"]
    reference = fixture.expected["text_classifier"]
    rows = [("ours float32", ours.text_seconds, f"min cosine to the original's {cosine_to(float32, reference).min():.6f}")]
    start = time.perf_counter()
    embeddings = model.get_text_embeddings(ids, dtype=torch.bfloat16)
    rows.append(("ours bfloat16 text option", time.perf_counter() - start,
                 f"min cosine to the original's {cosine_to(embeddings, reference).min():.6f}, max cosine distance "
                 f"to ours float32 {1 - cosine_to(embeddings, float32).min():.2e}"))
    for label, seconds, note in rows:  # printed now: the original's pass takes minutes
        print(f"  {label:<26} {seconds:8.2f} s  {note}", flush=True)
    if not args.no_original:
        original = Original(fixture).model
        original.test_text_classifier = None
        start = time.perf_counter()
        with torch.no_grad():
            text, _ = original.get_text_classifier()
        rows.insert(0, ("original", time.perf_counter() - start, f"{len(text)} synonym embeddings"))
    print(f"first call with a new {len(fixture.vocabulary)}-class vocabulary ({ids.shape[0]} prompts, "
          f"{torch.unique(ids, dim=0).shape[0]} distinct, {len(reference)} synonyms), "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()}")
    base = rows[0][1] if not args.no_original else None
    for label, seconds, note in rows:
        ratio = f"  {base / seconds:5.1f}x faster than the original" if base and label != "original" else ""
        print(f"  {label:<26} {seconds:8.2f} s  {note}{ratio}")


# ------------------------------------------------------------------------------------------ memory, vocabularies


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_variant(args):
    """In a fresh process: build one variant, run one call, print the time and the peak resident-set growth."""
    fixture = Fixture(args.fixture)
    vocabulary, is_thing = read_vocabulary_file(args.vocabulary_file) if args.vocabulary_file else (None, None)
    start = time.perf_counter()
    variant = build_variant(args.variant, fixture, torch.device("cpu"), vocabulary=vocabulary, is_thing=is_thing)
    text_seconds = time.perf_counter() - start
    baseline = rss_bytes()
    seconds = timed_call(variant, args.batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"seconds_per_image": seconds / args.batch, "peak_growth_mib": (peak - baseline) / 2**20,
              "peak_mib": peak / 2**20}
    if args.variant != "original":
        result["setup_with_text_seconds"] = text_seconds
    print("RESULT " + json.dumps(result))


def in_fresh_process(args, variant: str, batch: int, vocabulary_file: str | None = None, mode: str = "one") -> dict:
    command = [sys.executable, __file__, mode, "--fixture", args.fixture, "--variant", variant, "--batch", str(batch),
               "--rounds", str(args.rounds)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if vocabulary_file:
        command += ["--vocabulary-file", vocabulary_file]
    if getattr(args, "skip_float32_text", False):
        command += ["--skip-float32-text"]
    out = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    last = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
    raise SystemExit(f"{variant} failed in its process: {last[0]}")


def run_memory(args):
    names = (["original"] if not args.no_original else []) + ["ours float32", "ours bfloat16"]
    print("peak memory of one call (fresh process each; growth of the resident set over the loaded model)")
    for batch in args.batch_sizes:
        for name in names:
            r = in_fresh_process(args, name, batch)
            print(f"  batch {batch} {name:<16} {r['seconds_per_image']:6.2f} s/image  peak +{r['peak_growth_mib']:7.0f} MiB"
                  f"  (process peak {r['peak_mib']:.0f} MiB)")


def read_vocabulary_file(path: str) -> tuple[list[str], list[bool]]:
    classes = json.loads(Path(path).read_text())["classes"]
    return [c["name"] for c in classes], [bool(c.get("isthing", 1)) for c in classes]


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-set high-water mark (VmHWM) from now; False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_vocabulary(args):
    """In a fresh process, ours (float32, batch 1) with one vocabulary: its first text pass in float32 and with the
    bfloat16 text option, then a warm-up image call and `--rounds` timed ones; the peak resident set is that of the
    timed calls (high-water mark reset after the warm-up), so the text passes do not count in it."""
    fixture = Fixture(args.fixture)
    vocabulary, is_thing = read_vocabulary_file(args.vocabulary_file)
    if args.skip_float32_text:  # the image calls then use the bfloat16 text option's embeddings
        ours = Ours(fixture, torch.float32, torch.device("cpu"), vocabulary=vocabulary, is_thing=is_thing,
                    text_encoder_dtype="bfloat16")
        result = {"text_float32_seconds": None, "text_bfloat16_seconds": ours.text_seconds}
    else:
        ours = Ours(fixture, torch.float32, torch.device("cpu"), vocabulary=vocabulary, is_thing=is_thing)
        start = time.perf_counter()
        ours.model.get_text_embeddings(ours.input_ids, dtype=torch.bfloat16)
        result = {"text_float32_seconds": ours.text_seconds, "text_bfloat16_seconds": time.perf_counter() - start}
    result["prompts"] = ours.input_ids.shape[0]
    timed_call(ours, 1)
    baseline = rss_bytes()
    result["peak_reset"] = reset_peak_rss()
    seconds = [timed_call(ours, 1) for _ in range(args.rounds)]
    peak = peak_rss_bytes()
    result.update(seconds_per_image=statistics.median(seconds), rounds=seconds,
                  peak_growth_mib=(peak - baseline) / 2**20, peak_mib=peak / 2**20)
    print("RESULT " + json.dumps(result))


def run_vocabularies(args):
    folder = Path(args.vocabulary_dir)
    print(f"ours float32, batch 1, fresh process per vocabulary, {torch.get_num_threads()} threads: first text pass "
          f"(float32, bfloat16 text option), then one image (median of {args.rounds} after a warm-up) and its peak "
          f"resident set (growth over the loaded model and vocabulary); load average {os.getloadavg()}")
    for name in args.vocabularies:
        path = folder / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"--vocabulary-dir {folder}: no {name}.json there.")
        classes = json.loads(path.read_text())["classes"]
        r = in_fresh_process(args, "ours float32", 1, str(path), mode="one-vocabulary")
        rounds = ", ".join(f"{v:.2f}" for v in r["rounds"])
        peak = f"peak +{r['peak_growth_mib']:6.0f} MiB (process {r['peak_mib']:.0f} MiB)"
        if not r["peak_reset"]:
            peak += " [high-water mark not resettable here: includes the text passes]"
        float32 = r["text_float32_seconds"]
        float32 = (f"{float32:6.1f} s ({float32 / r['text_bfloat16_seconds']:4.1f}x the bfloat16 option's)"
                   if float32 is not None else "not run")
        print(f"  {name:<14} {len(classes):5d} classes {r['prompts']:6d} prompts  text bfloat16 "
              f"{r['text_bfloat16_seconds']:6.1f} s, float32 {float32}  image {r['seconds_per_image']:5.2f} s "
              f"[{rounds}]  {peak}", flush=True)
    print(f"load average after: {os.getloadavg()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["images", "text", "memory", "vocabularies", "one", "one-vocabulary"])
    parser.add_argument("--fixture", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "original-r50"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-original", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    parser.add_argument("--vocabulary-dir", default=str(Path(__file__).resolve().parents[1] / "eovseg" / "vocabularies"))
    parser.add_argument("--vocabularies", nargs="+", default=["coco_panoptic", "ade20k_150", "ade20k_847", "lvis_1203"])
    parser.add_argument("--skip-float32-text", action="store_true",
                        help="vocabularies: only the bfloat16 text option's pass (the float32 one takes minutes on CPU)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--vocabulary-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_fixture(args.fixture)  # before any variant's process is started
    {"images": run_images, "text": run_text, "memory": run_memory, "vocabularies": run_vocabularies,
     "one": one_variant, "one-vocabulary": one_vocabulary}[args.mode](args)


if __name__ == "__main__":
    main()
