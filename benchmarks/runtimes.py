"""Every way to run the R50 image path on this CPU, side by side in one run: eager float32, eager bfloat16,
torch.compile (float32), ONNX Runtime float32 and int8 (weights-only), OpenVINO float32 / bfloat16 / int8
(weights-only). Same image (the fidelity fixture's photo, 640x960 after the processor), same vocabulary, runtimes
alternating call by call, so a machine that gets busier slows them all alike.

    python benchmarks/runtimes.py                    # R50, random weights (timing does not depend on them)
    python benchmarks/runtimes.py --model DIR        # a converted model folder instead
    python benchmarks/runtimes.py --quick            # the tiny preset at 128x192, 1 round: checks the script works

Reported per runtime: seconds per image (median over the rounds; forward and panoptic post-processing, the text pass
excluded: a vocabulary's embeddings are computed once), the first call (after loading / compiling, which is given
apart), the peak resident memory a call adds to what the loaded runtime holds, and the cost against the vocabulary's
size (COCO-133, ADE-150, ADE-847, their real synonym counts). Each time is also given as a multiple of the floor of
this CPU (issue #23: about 376 GFLOP for the R50 image path at 640x960 with 150 classes; 174-201 GFLOP/s float32,
380-440 bfloat16 on 2 cores: 1.9 s float32, 0.85 s bfloat16; int8 runtimes against the float32 floor).
With `--components`, the eager float32 path's per-component times (where the time goes).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

FLOOR = {"float32": 1.9, "bfloat16": 0.85}
VOCABULARIES = {"COCO-133": "coco_panoptic", "ADE-150": "ade20k_150", "ADE-847": "ade20k_847"}
PHOTO = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "original-r50" / "coffee.png"


class PeakMemory:
    """The most resident memory seen (sampled every 2 ms) while the block runs, above what it was before."""

    def __enter__(self):
        from eovseg.cpu_memory import resident_bytes

        self._read, self.start, self.peak = resident_bytes, resident_bytes(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._read() - self.start)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read() - self.start)


def vocabulary(name: str, embed_dim: int, train_vocabulary) -> dict:
    """A built-in vocabulary's synonym structure and seen flags with random unit text embeddings."""
    from eovseg.classifier_eovseg import build_synonym_index
    from eovseg.vocabularies import get_vocabulary
    from eovseg.vocabulary import seen_class_mask, synonym_counts

    names = get_vocabulary(name).class_names
    counts = synonym_counts(names)
    embeddings = torch.randn(sum(counts), embed_dim, generator=torch.Generator().manual_seed(0))
    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    return {"text_embeddings": embeddings, "synonym_counts": torch.tensor(counts),
            "synonym_index": build_synonym_index(counts), "stuff": {i for i in range(len(names)) if i >= 100},
            "class_seen_mask": torch.tensor(seen_class_mask(names, train_vocabulary))}


class Eager:
    def __init__(self, model, dtype, compile_: bool = False):
        self.model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        self.forward = torch.compile(self.model, dynamic=False) if compile_ else self.model
        self.dtype = dtype

    def __call__(self, pixel_values, vocab):
        with torch.no_grad():
            outputs = self.forward(pixel_values.to(self.dtype), text_embeddings=vocab["text_embeddings"].to(self.dtype),
                                   synonym_counts=vocab["synonym_counts"].tolist(), class_seen_mask=vocab["class_seen_mask"])
        return {"class_queries_logits": outputs.class_queries_logits.float(),
                "masks_queries_logits": outputs.masks_queries_logits.float()}


class Exported:
    def __init__(self, folder: Path, precision: str, threads: int, providers=None):
        from eovseg.runtime import load

        self.graph = load(folder, precision=precision, threads=threads, providers=providers).image_graph

    def __call__(self, pixel_values, vocab):
        got = self.graph({"pixel_values": pixel_values.numpy(), "text_embeddings": vocab["text_embeddings"].numpy(),
                          "synonym_index": vocab["synonym_index"].numpy(),
                          "class_seen_mask": vocab["class_seen_mask"].numpy()})
        return {name: torch.from_numpy(got[name]) for name in ("class_queries_logits", "masks_queries_logits")}


def _tensorrt(fp16: bool, cache: Path):
    return [("TensorrtExecutionProvider", {"trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
                                           "trt_engine_cache_path": str(cache)}),
            "CUDAExecutionProvider", "CPUExecutionProvider"]


# name: (export format, export precision, precision at load, ONNX Runtime providers or None)
EXPORTED = {
    "ONNX Runtime float32": ("onnx", "float32", "float32", None),
    "ONNX Runtime int8": ("onnx", "int8", "float32", None),
    "OpenVINO float32": ("openvino", "float32", "float32", None),
    "OpenVINO bfloat16": ("openvino", "float32", "bfloat16", None),
    "OpenVINO int8": ("openvino", "int8", "float32", None),
    # GPU (benchmarks/gpu_suite.sh; needs onnxruntime-gpu, and TensorRT's libraries for the TensorRT provider)
    "ORT CUDA float32": ("onnx", "float32", "float32", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    "ORT TensorRT float32": ("onnx", "float32", "float32", "tensorrt32"),
    "ORT TensorRT float16": ("onnx", "float32", "float32", "tensorrt16"),
}
CPU_RUNTIMES = ["eager float32", "eager bfloat16", "torch.compile float32", "ONNX Runtime float32",
                "ONNX Runtime int8", "OpenVINO float32", "OpenVINO bfloat16", "OpenVINO int8"]
GPU_RUNTIMES = ["ORT CUDA float32", "ORT TensorRT float32", "ORT TensorRT float16"]


def post_process(processor, outputs, vocab, size):
    from eovseg.modeling_eovseg import EovSegOutput

    return processor.post_process_panoptic_segmentation(EovSegOutput(**outputs), label_ids_to_fuse=vocab["stuff"],
                                                        target_sizes=[size])


def build_runtimes(model, work: Path, threads: int, names) -> dict:
    """Every runtime of `names`, loaded: `{name: (callable, seconds to build: cast / export / convert / load, resident
    bytes the loaded runtime added)}`."""
    import json
    import shutil

    from eovseg.onnx_export import MANIFEST, _finish_graphs, export_graphs
    from eovseg.processing import EovSegProcessor

    eager = {"eager float32": (torch.float32, False), "eager bfloat16": (torch.bfloat16, False),
             "torch.compile float32": (torch.float32, True)}
    from eovseg.cpu_memory import resident_bytes

    runtimes, paths, folders = {}, None, {}
    for name in names:
        start, resident = time.perf_counter(), resident_bytes()
        if name in eager:
            runtimes[name] = (Eager(model, *eager[name]), time.perf_counter() - start, resident_bytes() - resident)
            continue
        format, precision, load_precision, providers = EXPORTED[name]
        if paths is None:
            (work / "graphs").mkdir(parents=True)
            paths = export_graphs(model, work / "graphs")
            print(f"exported the graphs in {time.perf_counter() - start:.0f} s")
            start = time.perf_counter()
        if (format, precision) not in folders:
            folder = folders[format, precision] = work / f"{format}-{precision}"
            folder.mkdir()
            copies = {graph: folder / path.name for graph, path in paths.items()}
            for graph, path in paths.items():
                shutil.copyfile(path, copies[graph])
            graphs = _finish_graphs(copies, format, precision, None)
            (folder / MANIFEST).write_text(json.dumps({"format": format, "precision": precision, "graphs": graphs}))
            model.config.to_json_file(str(folder / "config.json"))
            EovSegProcessor.from_config(model.config).save_pretrained(folder)
        if isinstance(providers, str):  # TensorRT, float32 or float16 engines
            providers = _tensorrt(providers.endswith("16"), work / "tensorrt")
        resident = resident_bytes()  # (the export and conversion above are not the runtime's)
        run = Exported(folders[format, precision], load_precision, threads, providers)
        runtimes[name] = (run, time.perf_counter() - start, resident_bytes() - resident)
    return runtimes


def measure(runtimes, processor, pixel_values, vocabularies, size, rounds: int, sweep_rounds: int):
    """First calls, then `rounds` alternating rounds at ADE-150 (times and peak memory), then the vocabulary sweep."""
    from eovseg.cpu_memory import resident_bytes

    first, times, peaks = {}, {name: [] for name in runtimes}, {name: 0 for name in runtimes}
    held = {name: loaded for name, (_, _, loaded) in runtimes.items()}
    main = vocabularies["ADE-150"]
    for name, (run, *_) in runtimes.items():
        resident, start = resident_bytes(), time.perf_counter()
        post_process(processor, run(pixel_values, main), main, size)
        first[name] = time.perf_counter() - start
        held[name] += resident_bytes() - resident  # what the first call allocated and keeps (arenas, kernels)
    for _ in range(rounds):
        for name, (run, *_) in runtimes.items():
            gc.collect()
            with PeakMemory() as memory:
                start = time.perf_counter()
                post_process(processor, run(pixel_values, main), main, size)
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], memory.peak)
    sweep = {name: {} for name in runtimes}
    for vocab_name, vocab in vocabularies.items():
        for name, (run, *_) in runtimes.items():  # a first call at this vocabulary size (a compiled program re-traces)
            post_process(processor, run(pixel_values, vocab), vocab, size)
        samples = {name: [] for name in runtimes}
        for _ in range(sweep_rounds):
            for name, (run, *_) in runtimes.items():
                start = time.perf_counter()
                post_process(processor, run(pixel_values, vocab), vocab, size)
                samples[name].append(time.perf_counter() - start)
        for name in runtimes:
            sweep[name][vocab_name] = statistics.median(samples[name])
    return first, times, peaks, held, sweep


def floor_of(name: str) -> tuple[str, float]:
    precision = "bfloat16" if "bfloat16" in name else "float32"
    return precision, FLOOR[precision]


def report(runtimes, first, times, peaks, held, sweep, quick: bool) -> None:
    header = (f"{'runtime':<24} {'s/image':>8} {'x floor':>8} {'first call':>11} {'load':>7} {'held MiB':>9} "
              f"{'peak MiB':>9}   " + " ".join(f"{v:>9}" for v in VOCABULARIES))
    print(header)
    print("-" * len(header))
    for name, (_, load_seconds, _) in runtimes.items():
        median = statistics.median(times[name])
        _, floor = floor_of(name)
        fraction = "" if quick or name.startswith("ORT ") else f"{median / floor:8.2f}"  # the floor is this CPU's
        costs = " ".join(f"{sweep[name][v]:9.3f}" for v in VOCABULARIES)
        print(f"{name:<24} {median:8.3f} {fraction:>8} {first[name]:11.2f} {load_seconds:7.1f} "
              f"{held[name] / 2**20:9.0f} {peaks[name] / 2**20:9.0f}   {costs}")
    print("(s/image: median, forward + panoptic post-processing at ADE-150; x floor: against 1.9 s float32 / 0.85 s "
          "bfloat16; first call after loading; load: build / export / convert / compile setup; held MiB: resident "
          "memory the loaded runtime and its first call keep; peak MiB: resident memory a later call adds on top; "
          "the last columns: s/image by vocabulary)")


def components(model, pixel_values, vocab, rounds: int) -> None:
    from latency import ComponentTimer

    timer = ComponentTimer(model, torch.device("cpu"))
    runs = []
    for _ in range(rounds):
        timer.reset()
        with torch.no_grad():
            model(pixel_values, text_embeddings=vocab["text_embeddings"], synonym_counts=vocab["synonym_counts"],
                  class_seen_mask=vocab["class_seen_mask"])
        runs.append(dict(timer.times))
    timer.remove()
    print("eager float32 per component (median s): " + ", ".join(
        f"{name} {statistics.median(run[name] for run in runs):.3f}" for name in runs[0]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a converted model folder (default: R50 with random weights)")
    parser.add_argument("--quick", action="store_true", help="the tiny preset at 128x192, 1 round (a smoke check)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds at ADE-150")
    parser.add_argument("--sweep-rounds", type=int, default=2, help="alternating rounds per vocabulary size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of every runtime")
    parser.add_argument("--runtimes", nargs="+", default=None, help="a subset, by name (default: every CPU one)")
    parser.add_argument("--gpu", action="store_true",
                        help="ONNX Runtime's CUDA and TensorRT providers instead (needs onnxruntime-gpu)")
    parser.add_argument("--components", action="store_true", help="also time the eager float32 path per component")
    args = parser.parse_args(argv)

    from PIL import Image

    from eovseg import EovSegConfig, EovSegForPanopticSegmentation
    from eovseg.processing import EovSegProcessor

    torch.set_num_threads(args.threads)
    if args.model:
        model = EovSegForPanopticSegmentation.from_pretrained(args.model)
    else:
        torch.manual_seed(0)
        model = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny" if args.quick else "r50"))
    model = model.float().eval()
    image_kwargs = {"size": {"shortest_edge": 128, "longest_edge": 192}} if args.quick else {}
    processor = EovSegProcessor.from_config(model.config, **image_kwargs)
    image = Image.open(PHOTO).convert("RGB")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    size = (image.height, image.width)
    train = model.config.train_vocabulary or []
    vocabularies = {label: vocabulary(name, model.config.embed_dim, train) for label, name in VOCABULARIES.items()}
    rounds, sweep_rounds = (1, 1) if args.quick else (args.rounds, args.sweep_rounds)
    names = args.runtimes or (GPU_RUNTIMES if args.gpu else CPU_RUNTIMES)
    unknown = sorted(set(names) - set(CPU_RUNTIMES) - set(GPU_RUNTIMES))
    if unknown:
        parser.error(f"unknown runtimes {unknown}; known: {CPU_RUNTIMES + GPU_RUNTIMES}")
    print(f"{'tiny (--quick)' if args.quick else args.model or 'R50 (random weights)'}, input "
          f"{tuple(pixel_values.shape[-2:])}, {args.threads} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="eovseg-runtimes-") as work:
        runtimes = build_runtimes(model, Path(work), args.threads, names)
        results = measure(runtimes, processor, pixel_values, vocabularies, size, rounds, sweep_rounds)
        report(runtimes, *results, args.quick)
    if args.components:
        components(model, pixel_values, vocabularies["ADE-150"], rounds)


if __name__ == "__main__":
    main()
