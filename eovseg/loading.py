"""What the inference commands (`eovseg demo`, `eovseg predict`, `eovseg app`) load, in one place: a model folder
(through the one loader, `eovseg.auto_registration.load_model_folder`), the vocabulary asked for (through
`eovseg.vocabularies.load_vocabulary`), an image file (through the one decoder, `eovseg.inputs.read_image_file`), and
their defaults: the bundled demo model, its synthetic scene and the bundled photograph; and the command-line
options that choose the model and the vocabulary, worded once for the three commands.

Importing this module imports neither torch nor transformers: the commands' argument parsers read their defaults
here, and `eovseg COMMAND --help` must answer at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from .command_line import non_empty_text

__all__ = [
    "BUNDLED_IMAGE",
    "add_model_option",
    "add_vocabulary_options",
    "ModelOutputError",
    "ResolvedVocabulary",
    "check_finite_outputs",
    "check_model_folder",
    "check_vocabulary_options",
    "default_image_path",
    "default_model_path",
    "has_stored_vocabulary",
    "load_model",
    "read_image",
    "resolve_vocabulary",
]

ASSETS = Path(__file__).with_name("assets")
# A real photograph, for models converted from the authors' checkpoints (and the conversion's sanity run).
BUNDLED_IMAGE = ASSETS / "coffee.jpg"

# the image files `eovseg predict` finds in folders (and the web page and `eovseg export --calibration` take)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def default_model_path() -> Path:
    """The bundled demo model: a folder written by `save_pretrained` (the tiny preset in the toy world, see
    docs/toy_world.md), the model of every inference command run without `--model`."""
    return ASSETS / "demo_model"


def default_image_path() -> Path:
    """The bundled toy-world scene (256 px, with classes unseen in panoptic training) that the demo model segments."""
    return ASSETS / "shapes_scene.png"


# ----------------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------------


def add_model_option(parser) -> None:
    """`--model DIR`, the model folder of `demo`, `predict` and `app`."""
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a saved or converted model folder (default: the bundled demo model, a toy that knows "
                             "only the 18 classes of its toy world)")


def add_vocabulary_options(parser) -> None:
    """`--vocabulary`, `--classes` and `--stuff` of `demo` and `predict` (read by [`resolve_vocabulary`])."""
    parser.add_argument("--vocabulary", type=non_empty_text, default=None, metavar="NAME|FILE",
                        help="a built-in vocabulary (ade20k_150, coco_panoptic, ...) or a vocabulary file (.json, "
                             ".txt; a JSON file's colours are drawn), instead of --classes")
    parser.add_argument("--classes", nargs="+", type=non_empty_text, default=None, metavar="CLASS",
                        help='the classes to find, each with its synonyms after commas: "car, automobile" "road" '
                             "(default: the model's vocabulary)")
    parser.add_argument("--stuff", nargs="+", type=non_empty_text, default=None, metavar="CLASS",
                        help="which of --classes are stuff (their regions merged, not split into instances)")


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def check_model_folder(model_path: str | os.PathLike | None) -> Path:
    """`model_path` (default: the bundled demo model) as a Path, refused in one line unless it is a saved model
    folder."""
    path = Path(model_path) if model_path is not None else default_model_path()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {str(path)!r} is not a folder with a config.json (a saved or converted model).")
    return path


def load_model(model_path: str | os.PathLike | None = None, device="cpu"):
    """`(model, processor)` of a saved model folder (default: the bundled demo model), in eval mode on `device`,
    through the one model-folder loader (its errors name the file and the problem)."""
    from .auto_registration import load_model_folder

    model, processor = load_model_folder(check_model_folder(model_path))
    return model.to(device).eval(), processor


def has_stored_vocabulary(model) -> bool:
    """Whether the model holds the text embeddings of its default vocabulary (else that vocabulary is encoded)."""
    stored = getattr(model, "default_text_embeddings", None)
    return stored is not None and bool(stored.abs().sum() > 0)


class ModelOutputError(ValueError):
    """The model gave NaN or infinite logits (broken weights, or an overflow): reported, never "0 segments"."""


def check_finite_outputs(outputs) -> None:
    """Refuse NaN or infinite class or mask logits: post-processing them finds no segment, or one class everywhere,
    and says nothing. The demo, `eovseg predict` and the web page check every forward pass with this."""
    import torch

    for name in ("class_queries_logits", "masks_queries_logits"):
        logits = getattr(outputs, name, None)
        if logits is not None and not bool(torch.isfinite(logits).all()):
            raise ModelOutputError(f"the model's {name} hold NaN or infinite values: its weights are broken (or "
                                   "overflow in this precision), so no segmentation can be trusted.")


# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------------------------


class ResolvedVocabulary(NamedTuple):
    """The vocabulary a command runs with."""

    class_names: list[str]
    is_thing: list[bool]
    given: bool  # False for the model's default vocabulary, whose stored text embeddings can be used
    colors: list[tuple[int, int, int]] | None  # the display colour of each class, where a vocabulary (file) has them


def check_vocabulary_options(classes: Sequence[str] | None, stuff: Sequence[str] | None, vocabulary: str | None):
    """Refuse a combination of `--classes`, `--stuff` and `--vocabulary` that names no one vocabulary, an unknown
    vocabulary name, a bad vocabulary file or a `--stuff` entry not among `--classes` (so that it is refused before
    the model is loaded). Returns the vocabulary asked for (a `Vocabulary`), or None for the model's default."""
    from .vocabularies import load_vocabulary
    from .vocabulary import VocabularyError

    if vocabulary and classes:
        raise VocabularyError("give the classes (--classes) or a vocabulary (--vocabulary), not both.")
    if stuff and not classes:
        raise VocabularyError("--stuff names some of --classes: give --classes too.")
    if vocabulary:
        return load_vocabulary(vocabulary)
    return load_vocabulary(list(classes), stuff=stuff) if classes else None


def resolve_vocabulary(config, classes: Sequence[str] | None = None, stuff: Sequence[str] | None = None,
                       vocabulary: str | None = None) -> ResolvedVocabulary:
    """`(class_names, is_thing, given, colors)`: a built-in vocabulary or vocabulary file by name (`vocabulary`), the
    class entries asked for (`classes`: things unless named in `stuff`) or, with neither, the model's default
    vocabulary (`given` False: its stored text embeddings can be used). `colors` are the vocabulary's own (a built-in
    one's, or a file's that has them) for the drawing, else None. Errors are `VocabularyError`s (one line)."""
    from .vocabulary import VocabularyError

    found = check_vocabulary_options(classes, stuff, vocabulary)
    if found is None:
        if not config.vocabulary:
            raise VocabularyError("this model has no default vocabulary: give the classes to find (--classes ...) or "
                                  "a vocabulary (--vocabulary NAME|FILE).")
        return ResolvedVocabulary(list(config.vocabulary), [bool(t) for t in config.is_thing], False, None)
    return ResolvedVocabulary(list(found.class_names), [bool(t) for t in found.is_thing], True,
                              list(found.colors) if found.colors else None)


# ----------------------------------------------------------------------------------------------------------------------
# Image
# ----------------------------------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike, where: str | None = None):
    """An image file as 8-bit RGB by the project's one rule (16-bit and float images scaled, not saturated), so one
    file gives one result in every command; errors are one line naming the file."""
    from .inputs import read_image_file

    return read_image_file(path, where)
