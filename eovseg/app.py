"""A web demo in the browser: `eovseg app` (needs `pip install -e ".[app]"`), then open http://127.0.0.1:7860.

    eovseg app [--model DIR] [--port 7860] [--host 127.0.0.1]

Upload an image file (or pick the example), write the classes to find, one per line (synonyms by commas; end a line with
`(stuff)` for a class whose regions are merged rather than split into instances), or pick a built-in vocabulary;
choose the subtask and thresholds. The page shows the image with the segments labelled, a legend of the classes
found, and offers the segments (COCO panoptic JSON) and the panoptic PNG for download. A class list's text
embeddings are computed once and reused while it stays the same. It runs on the CPU; nothing is sent anywhere (the
server listens on 127.0.0.1 unless told otherwise, with Gradio's analytics off).

The page hands the uploaded file itself to the project's one image decoder (`eovseg.inputs.read_image_file`), as
`eovseg predict` reads it: Gradio never converts it first (a 16-bit PNG would be saturated, a float or int32 TIFF
read by other rules). The same file gives the same segments as `predict`, and a file `predict` refuses is refused
here with the same message.
"""

from __future__ import annotations

import argparse
import atexit
import html
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from .command_line import add_progress_option, command_main, command_parser, port_number, progress_switch

# Read by Gradio at import time: no usage reports, no update check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

STUFF_MARK = "(stuff)"
CUSTOM = "(the class list)"
# Pictures whose shorter side is at most half this are shown enlarged by the whole factor DISPLAY_SIDE // shorter
# side, so that a small image (the bundled example) and its labels are seen at the column's width, not as a thumbnail
# that the labels cover.
DISPLAY_SIDE = 512
# The pictures fill their column (Gradio shows an image no larger than its file); errors read as errors.
PAGE_CSS = """
#result img, #input-preview img { width: 100%; height: auto; max-height: none; object-fit: contain; }
.eovseg-error { color: #b00020; font-weight: 600; padding: 4px 0; overflow-wrap: anywhere; }
.eovseg-note { color: #333; padding: 4px 0; }
"""


def parse_class_list(text: str) -> tuple[list[str], list[bool]]:
    """Class entries and thing flags from the text box: one class per line, `(stuff)` at the end marks stuff."""
    names, is_thing = [], []
    for line in (text or "").splitlines():
        line = line.strip()
        stuff = line.lower().endswith(STUFF_MARK)
        if stuff:
            line = line[: -len(STUFF_MARK)].strip()
        if line:
            names.append(line)
            is_thing.append(not stuff)
    return names, is_thing


def format_class_list(names: Sequence[str], is_thing: Sequence[bool]) -> str:
    return "\n".join(name if thing else f"{name} {STUFF_MARK}" for name, thing in zip(names, is_thing))


def vocabulary_text(name: str) -> str:
    """A built-in vocabulary as the class list of the text box."""
    from .vocabularies import get_vocabulary

    vocabulary = get_vocabulary(name)
    return format_class_list(vocabulary.class_names, vocabulary.is_thing)


def example_image() -> str:
    from .loading import default_image_path

    return str(default_image_path())


def legend_html(entries) -> str:
    """The classes found as colour swatches with names and segment counts."""
    if not entries:
        return '<div class="eovseg-legend"><em>No segments found.</em></div>'
    items = "".join(
        f'<span class="eovseg-legend-item" style="display:inline-block;margin:2px 10px 2px 0">'
        f'<span style="display:inline-block;width:14px;height:14px;vertical-align:middle;'
        f'background:rgb{tuple(color)}"></span> {html.escape(name)} &times;{count}</span>'
        for name, color, count in entries
    )
    return f'<div class="eovseg-legend">{items}</div>'


class SegmentationApp:
    """The work behind the page, without Gradio (what the unit tests call)."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        # removed when the process exits (not with this object: the paths it returned stay readable until then); the
        # page's files are downloads, not results to keep
        self.output_root = Path(tempfile.mkdtemp(prefix="eovseg-app-"))
        atexit.register(shutil.rmtree, self.output_root, ignore_errors=True)
        self.calls = 0

    def vocabulary(self, class_text: str):
        from .loading import resolve_vocabulary

        names, is_thing = parse_class_list(class_text)
        if not names:
            return resolve_vocabulary(self.model.config)
        return resolve_vocabulary(self.model.config, names, [n for n, thing in zip(names, is_thing) if not thing])

    def segment(self, image, class_text: str, subtask: str = "panoptic", threshold: float = 0.0,
                overlap: float = 0.8, mask_threshold: float = 0.5, progress=None):
        """`(overlay image, legend HTML, segments JSON path, panoptic PNG path)` for one image: an image file's path
        (what the page gives) or an image in memory."""
        import functools

        from .export import panoptic_to_coco
        from .predictor import Predictor
        from .runtime import EovSegRuntime
        from .visualization import draw_segments, legend_entries

        # `progress(fraction, desc=...)` (Gradio's Progress on the page) is told each step; the overlay is enlarged
        # as the page shows it (DISPLAY_SIDE). Not `progress or ...`: Gradio's Progress is falsy (an empty iterable).
        if progress is None:
            progress = _no_progress
        progress(0.0, desc="Reading the image")
        image = read_upload(image)
        names, is_thing, given, _ = self.vocabulary(class_text)
        progress(0.1, desc=f"Text pass: {len(names)} class names (once per class list)")
        # an `eovseg export` folder (--runtime) makes its own predictor
        make = self.model.predictor if isinstance(self.model, EovSegRuntime) else functools.partial(
            Predictor, self.model, self.processor)
        predictor = make(names, is_thing, given, subtask, threshold, overlap, mask_threshold)
        progress(0.5, desc=f"Segmenting the {image.width}x{image.height} image")
        result = predictor([image])[0]
        progress(0.9, desc="Drawing the segments")
        overlay = draw_segments(image, result["segmentation"], result["segments_info"], names, min_side=DISPLAY_SIDE)
        self.calls += 1
        folder = self.output_root / f"{self.calls:06d}"
        folder.mkdir()
        png, segments = panoptic_to_coco(result, is_thing)
        png.save(folder / "panoptic.png")
        categories = [{"id": i, "name": n, "isthing": int(t)} for i, (n, t) in enumerate(zip(names, is_thing))]
        (folder / "segments.json").write_text(json.dumps({
            "subtask": subtask, "height": image.height, "width": image.width, "file_name": "panoptic.png",
            "segments_info": segments, "categories": categories}, indent=1))
        legend = legend_html(legend_entries(result["segments_info"], names))
        return overlay, legend, str(folder / "segments.json"), str(folder / "panoptic.png")


def _no_progress(fraction, desc=None):
    """Progress reports of a run outside the page (tests, scripts): none."""


def read_upload(image):
    """The image of an upload, decoded as `eovseg predict` decodes a file (a path), or an image in memory."""
    from .inputs import read_image_file, to_rgb_image

    if image is None:
        raise ValueError("Upload an image or pick the example first.")
    if isinstance(image, (str, os.PathLike)):
        return read_image_file(image, f"the uploaded file {Path(image).name!r}")
    return to_rgb_image(image, "the uploaded image")


def display_copy(image):
    """The image as the page shows it: a small one enlarged by a whole factor (sharp pixels), see `DISPLAY_SIDE`."""
    from .visualization import enlarge

    return enlarge(image, DISPLAY_SIDE)


def message_html(text: str = "", error: bool = False) -> str:
    """The line under the result: what the run found, or the project's one-line error."""
    if not text:
        return ""
    kind = "eovseg-error" if error else "eovseg-note"
    return f'<div class="{kind}">{html.escape(text)}</div>'


def error_message(err: BaseException) -> str:
    from .command_line import error_line

    return f"eovseg app: error: {error_line(err)}"


def page_run(app: SegmentationApp):
    """The Segment button's handler: the five outputs (picture, legend, JSON, PNG, message). A failed run clears the
    earlier run's picture, legend and files and shows the project's one-line error instead (raising would leave
    them on the page under Gradio's bare "Error" badges)."""

    from .command_line import USER_ERRORS, error_line

    def run(image, class_text, subtask, threshold, overlap, mask_threshold, progress=None):
        try:
            picture, legend, json_path, png_path = app.segment(image, class_text, subtask, threshold, overlap,
                                                               mask_threshold, progress)
        except USER_ERRORS as err:
            return None, "", None, None, message_html(error_message(err), error=True)
        except Exception as err:  # a bug: its traceback goes to the server's console, the page still says it failed
            traceback.print_exc()
            return None, "", None, None, message_html(f"eovseg app: internal error: {type(err).__name__}: "
                                                      f"{error_line(err)}", error=True)
        count = len(json.loads(Path(json_path).read_text())["segments_info"])
        return picture, legend, json_path, png_path, message_html(f"{count} segment{'s' * (count != 1)} found.")

    return run


def page_preview(path):
    """The upload's handler: the decoded image, and the earlier result cleared (it showed another image); an
    unreadable file gives the project's one-line error."""
    from .command_line import USER_ERRORS

    cleared = (None, "", None, None)
    if path is None:
        return (None, *cleared, "")
    try:
        return (display_copy(read_upload(path)), *cleared, "")
    except USER_ERRORS as err:
        return (None, *cleared, message_html(error_message(err), error=True))


def build_demo(app: SegmentationApp):
    """The Gradio page around `app`."""
    import gradio as gr

    from .predict import IMAGE_SUFFIXES
    from .vocabularies import list_vocabularies

    config = app.model.config
    default_text = format_class_list(config.vocabulary, config.is_thing) if config.vocabulary else ""

    run = page_run(app)

    def segment(image, class_text, subtask, threshold, overlap, mask_threshold,
                progress=gr.Progress(track_tqdm=True)):
        return run(image, class_text, subtask, threshold, overlap, mask_threshold, progress)

    def pick(name):
        return gr.update() if name == CUSTOM else vocabulary_text(name)

    with gr.Blocks(title="EOV-Seg open-vocabulary segmentation", analytics_enabled=False) as demo:
        gr.Markdown("## EOV-Seg: segment an image with your own class list")
        with gr.Row():
            with gr.Column():
                # The file as uploaded (gr.Image would convert it with PIL first); the preview shows it as decoded.
                image = gr.File(label="Image file", file_types=list(IMAGE_SUFFIXES), type="filepath",
                                elem_id="input-image")
                shown = gr.Image(type="pil", label="The image as read", elem_id="input-preview", interactive=False,
                                 format="png")
                gr.Examples([[example_image()]], inputs=[image])
                vocabulary = gr.Dropdown([CUSTOM, *list_vocabularies()], value=CUSTOM, label="Built-in vocabulary",
                                         elem_id="vocabulary")
                classes = gr.Textbox(default_text, lines=8, elem_id="classes",
                                     label=f"Classes: one per line, synonyms by commas, '{STUFF_MARK}' at the end for stuff")
                subtask = gr.Radio(["panoptic", "semantic", "instance"], value="panoptic", label="Subtask")
                threshold = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Least class probability of a segment")
                overlap = gr.Slider(0.0, 1.0, value=0.8, step=0.01, label="Overlap mask-area threshold (panoptic)")
                mask_threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Mask threshold")
                button = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column():
                # PNG, not Gradio's default WebP: labels and outlines stay sharp
                result = gr.Image(type="pil", label="Result", elem_id="result", interactive=False, format="png")
                message = gr.HTML(elem_id="message")
                legend = gr.HTML(elem_id="legend")
                segments_file = gr.File(label="Segments (COCO panoptic JSON)", elem_id="segments-json")
                png_file = gr.File(label="Panoptic PNG (id = R + 256 G + 256^2 B)", elem_id="panoptic-png")
        outputs = [result, legend, segments_file, png_file, message]
        image.change(page_preview, inputs=[image], outputs=[shown, *outputs], show_progress_on=[shown])
        vocabulary.change(pick, inputs=[vocabulary], outputs=[classes])
        # the steps are shown once, over the picture (not repeated over every output)
        button.click(segment, inputs=[image, classes, subtask, threshold, overlap, mask_threshold], outputs=outputs,
                     concurrency_limit=1, show_progress_on=[result])
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("app", __doc__)
    from .loading import add_model_option

    add_model_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=port_number, default=7860, help="port to listen on")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime", "openvino"), default="torch",
                        help="torch, or run an `eovseg export` folder given as --model with ONNX Runtime or OpenVINO")
    add_progress_option(parser)
    return parser


def launch(demo, host: str, port: int, block: bool = True):
    """Serve the page locally, with fonts from the system (no font download)."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return demo.launch(server_name=host, server_port=port, share=False, theme=theme, css=PAGE_CSS, quiet=True,
                       ssr_mode=False, prevent_thread_lock=not block, footer_links=[])


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with progress_switch(not args.no_progress):
        return _serve(args)


def _serve(args) -> int:
    from .loading import load_model

    # the arguments first: a wrong --model is reported the same way with or without the optional extra
    if args.runtime == "torch":
        model, processor = load_model(args.model)
    else:
        from .runtime import load

        if args.model is None:
            raise ValueError(f"--runtime {args.runtime} runs an `eovseg export` folder: give it as --model.")
        model = load(args.model, args.runtime)
        processor = model.processor
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('eovseg app: error: the web demo needs Gradio: pip install -e ".[app]"', file=sys.stderr)
        return 1
    print(f"EOV-Seg demo on http://{args.host}:{args.port}")
    try:
        launch(build_demo(SegmentationApp(model, processor)), args.host, args.port)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise OSError(f"cannot serve on {args.host}:{args.port} ({err}); pick another --port.") from None
    return 0


main = command_main(_main, "app")


if __name__ == "__main__":
    sys.exit(main())
