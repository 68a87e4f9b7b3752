"""Registration of EOV-Seg with the Transformers Auto classes and pipelines, and the remote-code files of a saved
folder (so `from_pretrained(..., trust_remote_code=True)` works where `eovseg` is not installed, as on the Hub)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import re
import sys
import threading
from pathlib import Path

_PACKAGE_DIR = Path(__file__).parent

# Files copied flat into a saved folder for trust_remote_code, with package-relative imports made flat.
REMOTE_CODE_FILES = [
    "configuration_eovseg.py",
    "modeling_eovseg.py",
    "classifier_eovseg.py",
    "cpu_memory.py",
    "inputs.py",
    "loss_eovseg.py",
    "opsnet_eovseg.py",
    "vocabulary.py",
    "processing/image_processing_eovseg.py",
    "processing/image_processing_pil_eovseg.py",
    "processing/processing_eovseg.py",
    "processing/tokenization_eovseg.py",
    "pipeline_eovseg.py",
    "vocabularies/__init__.py",  # copied as vocabularies.py; the built-in vocabularies' data files are not copied
]

MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_eovseg.EovSegConfig",
    "AutoModel": "modeling_eovseg.EovSegForPanopticSegmentation",
    "AutoModelForImageSegmentation": "modeling_eovseg.EovSegForPanopticSegmentation",
    "AutoModelForUniversalSegmentation": "modeling_eovseg.EovSegForPanopticSegmentation",
}
# Only AutoProcessor: an "AutoImageProcessor" entry makes transformers' AutoVideoProcessor (which pipelines try)
# look for a remote video processor and prompt the user about remote code even when eovseg is installed.
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_eovseg.EovSegProcessor"}
# transformers' custom pipelines (read from config.json; needed only where eovseg is not imported, see
# `EovSegConfig`): pipeline("open-vocabulary-segmentation", model=DIR, trust_remote_code=True) builds this class.
CUSTOM_PIPELINES = {
    "open-vocabulary-segmentation": {
        "impl": "pipeline_eovseg.OpenVocabularySegmentationPipeline",
        "pt": ["AutoModelForUniversalSegmentation"],
        "type": "multimodal",
    }
}
# AutoImageProcessor (which pipeline("image-segmentation") calls) reads the image processor entry nested in
# processor_config.json before preprocessor_config.json: the entry there lets it find the remote class where eovseg is
# not installed, without making the video-processor lookup ask about remote code.
# One class per transformers backend; where eovseg is installed its registration below makes PIL the default.
IMAGE_PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": {
        "torchvision": "image_processing_eovseg.EovSegImageProcessor",
        "pil": "image_processing_pil_eovseg.EovSegImageProcessorPil",
    }
}

_registered = False
_registering = False


def register() -> None:
    """Register the config, model, image processor, processor and the open-vocabulary pipeline (idempotent)."""
    global _registering
    if _registered or _registering:  # registering imports eovseg modules, whose imports would call it again
        return
    _registering = True
    try:
        _register()
    finally:
        _registering = False


def _register() -> None:
    global _registered
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageSegmentation,
        AutoModelForUniversalSegmentation,
        AutoProcessor,
    )
    from transformers.models.auto import modeling_auto

    from .configuration_eovseg import EovSegConfig
    from .modeling_eovseg import EovSegForPanopticSegmentation
    from .processing import EovSegImageProcessor, EovSegImageProcessorPil, EovSegProcessor

    AutoConfig.register("eovseg", EovSegConfig, exist_ok=True)
    for auto_class in (AutoModel, AutoModelForImageSegmentation, AutoModelForUniversalSegmentation):
        auto_class.register(EovSegConfig, EovSegForPanopticSegmentation, exist_ok=True)
    AutoImageProcessor.register(
        EovSegConfig, image_processor_classes={"torchvision": EovSegImageProcessor, "pil": EovSegImageProcessorPil},
        exist_ok=True,
    )
    _default_to_pil_backend(EovSegImageProcessor.__name__)
    AutoProcessor.register(EovSegConfig, EovSegProcessor, exist_ok=True)
    # The image-segmentation pipeline checks the model class against these name tables.
    modeling_auto.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES.setdefault("eovseg", "EovSegForPanopticSegmentation")

    from .configuration_eovseg import set_saved_folder_hook
    from .pipeline_eovseg import register_pipeline

    register_pipeline()
    set_saved_folder_hook(complete_model_folder)
    _registered = True
    _stop_watching_imports()


# ----------------------------------------------------------------------------------------------------------------------
# Registration once transformers is imported: `import eovseg` stays light
# ----------------------------------------------------------------------------------------------------------------------

_imports_running = threading.local()  # how many eovseg modules (or transformers) this thread is executing


class _Reporting:
    """Mixed into a file loader: after the outermost import of an eovseg module (or of transformers) finishes, it
    registers eovseg if transformers is imported by then. Not inside one: registering imports the eovseg modules, and
    one that is half-executed (the one whose import brought transformers in) cannot be imported again."""

    def exec_module(self, module) -> None:
        _imports_running.depth = getattr(_imports_running, "depth", 0) + 1
        try:
            super().exec_module(module)
        finally:
            _imports_running.depth -= 1
        if _imports_running.depth == 0 and "transformers" in sys.modules:
            register()


# The file loaders a module can come with: from source, or from a .pyc alone (an install that ships no .py files).
# Each gets a reporting subclass, so the swapped loader is still an instance of the class the finder chose.
_REPORTING_LOADERS = {
    loader: type(f"_Reporting{loader.__name__}", (_Reporting, loader), {})
    for loader in (importlib.machinery.SourceFileLoader, importlib.machinery.SourcelessFileLoader)
}


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """Gives transformers and the eovseg modules a reporting loader ([`_Reporting`]): finds them with the other
    finders and swaps the file loader they return for its reporting subclass (same file, same behaviour, plus the
    registration). A module that comes with another loader is left as it is: the lazy classes of `eovseg`
    (`eovseg.EovSegConfig`, ...) register on first use whatever loaded them."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" and not name.startswith("eovseg."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        reporting = _REPORTING_LOADERS.get(type(spec.loader))
        if reporting is not None:
            spec.loader = reporting(spec.loader.name, spec.loader.path)
        return spec


_watcher = _ImportWatcher()


def register_when_transformers_loads() -> None:
    """Register now if transformers is imported, else as soon as it is: no Auto class or pipeline can be used before,
    and a program that never imports it (`eovseg --help`) does not pay for torch and transformers."""
    if "transformers" in sys.modules:
        if not getattr(_imports_running, "depth", 0):  # else the reporting loader registers once that import ends
            register()
    elif not _registered and _watcher not in sys.meta_path:
        sys.meta_path.insert(0, _watcher)


def _stop_watching_imports() -> None:
    if _watcher in sys.meta_path:
        sys.meta_path.remove(_watcher)


def _default_to_pil_backend(class_name: str) -> None:
    """Make the PIL backend what `AutoImageProcessor.from_pretrained` (and so `EovSegProcessor.from_pretrained` and
    the pipelines) loads for a folder of `class_name` when no `backend=` is given.

    The released weights were trained and evaluated on images resized by PIL, and torchvision's antialiased resize
    differs from it by up to 2 grey levels when it downscales, so the default keeps the original's numbers;
    `backend="torchvision"` still selects the torchvision class. transformers keeps the processors it defaults to
    PIL for the same reason (resizes torchvision does not reproduce) in this list of its auto module.
    """
    from transformers.models.auto import image_processing_auto

    defaults = getattr(image_processing_auto, "DEFAULT_TO_PIL_BACKEND_IMAGE_PROCESSORS", None)
    if isinstance(defaults, list) and class_name not in defaults:
        defaults.append(class_name)


def _flatten_imports(source: str) -> str:
    # `from ..vocabulary import x` (in processing/) becomes flat `from .vocabulary import x`, and the processing
    # package's `from .processing import EovSegProcessor` its module's.
    source = re.sub(r"^(\s*)from \.\.(\w+) import", r"\1from .\2 import", source, flags=re.MULTILINE)
    return re.sub(r"^(\s*)from \.processing import EovSegProcessor$", r"\1from .processing_eovseg import EovSegProcessor",
                  source, flags=re.MULTILINE)


# First line of every code file copied into a folder: only a file carrying it is written again (save_pretrained into a
# folder that holds a file of the user's of the same name, an `inputs.py`, leaves that file alone).
COPIED_CODE_MARKER = "# Copied by eovseg into this model folder for trust_remote_code; edit the eovseg package instead."


def _flat_name(relative: str) -> str:
    path = Path(relative)
    return f"{path.parent.name}.py" if path.name == "__init__.py" else path.name


def add_remote_code(folder: str | Path) -> None:
    """Copy the code files into a saved model folder and add `auto_map` entries (and the custom pipelines) to its
    config and processor files, those of them that are there."""
    folder = Path(folder)
    kept = []
    for relative in REMOTE_CODE_FILES:
        target = folder / _flat_name(relative)
        if target.exists() and not _is_copied_code(target):
            kept.append(target.name)
            continue
        source = (_PACKAGE_DIR / relative).read_text(encoding="utf-8")
        target.write_text(f"{COPIED_CODE_MARKER}\n{_flatten_imports(source)}", encoding="utf-8")
    if kept:
        import warnings

        warnings.warn(f"{folder}: left the files {', '.join(kept)} alone (not written by eovseg); "
                      "trust_remote_code=True will not work from this folder.", stacklevel=3)
    if (folder / "config.json").is_file():
        _add_auto_map(folder / "config.json", MODEL_AUTO_MAP, custom_pipelines=CUSTOM_PIPELINES)
    if (folder / "processor_config.json").is_file():
        _add_auto_map(folder / "processor_config.json", PROCESSOR_AUTO_MAP, IMAGE_PROCESSOR_AUTO_MAP)


def _is_copied_code(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().rstrip("\n") == COPIED_CODE_MARKER
    except (OSError, UnicodeDecodeError):
        return False


def _users_file(path: Path) -> bool:
    """A README.md or code file of a name eovseg writes, that eovseg did not write."""
    from .model_card import is_eovseg_card

    if not path.is_file():
        return False
    if path.name == "README.md":
        return not is_eovseg_card(path)
    return path.name in {_flat_name(relative) for relative in REMOTE_CODE_FILES} and not _is_copied_code(path)


def _add_auto_map(path: Path, auto_map: dict[str, str], image_processor_auto_map: dict[str, str] | None = None,
                  custom_pipelines: dict | None = None) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("auto_map", {}).update(auto_map)
    if image_processor_auto_map and isinstance(data.get("image_processor"), dict):
        data["image_processor"].setdefault("auto_map", {}).update(image_processor_auto_map)
    if custom_pipelines:
        data.setdefault("custom_pipelines", {}).update(custom_pipelines)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def complete_model_folder(folder: str | Path, model=None) -> None:
    """What every folder a model or processor of eovseg is saved into gets after `save_pretrained` (the Trainer's
    too): the code files and entries for `trust_remote_code` and the pipelines, and, when the model is saved, a
    model card unless the folder has a README.md (the training command and the conversion write theirs with the
    figures of their run)."""
    add_remote_code(folder)
    if model is not None:
        from .model_card import write_model_card

        write_model_card(folder, model.config, model.num_parameters(), replace=False)


def save_model_folder(model, processor, folder: str | Path) -> None:
    """`save_pretrained` of model and processor into `folder` (which add what `trust_remote_code=True` and the
    pipelines need, and a model card), plus the stand-alone image processor file (which AutoImageProcessor and older
    readers look for)."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)


def save_model_folder_atomically(
    model, processor, folder: str | Path, extra_files: dict[str, str] | None = None, checkpoint: Path | None = None
) -> list[str]:
    """[`save_model_folder`] into `folder` all or nothing: written to a hidden staging folder inside it (same file
    system), then each file moved in by `os.replace`, replacing files of the same names only (every other file
    stays). A failure while writing (a full disk) leaves `folder` as it was. `extra_files` are written beside (name:
    text); `checkpoint` (a conversion's source) is never replaced. Returns the names moved in."""
    import os
    import shutil
    import tempfile

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".eovseg-saving-", dir=folder))
    try:
        save_model_folder(model, processor, staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        # the user's README.md and files of the code files' names stay (eovseg writes its own only)
        names = sorted(p.name for p in staging.iterdir() if not _users_file(folder / p.name))
        for name in names:
            target = folder / name
            if checkpoint is not None and target.exists() and target.resolve() == Path(checkpoint).resolve():
                raise ValueError(f"saving writes {name!r}, which would replace the checkpoint {str(checkpoint)!r}: "
                                 "choose another output folder")
            if (staging / name).is_dir() or target.is_dir() or target.is_symlink():
                raise ValueError(f"{str(target)!r} is a folder or a link; saving would replace it with a file of its "
                                 "own: choose another folder")
        for name in names:
            os.replace(staging / name, folder / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return names


def load_model_folder(folder: str | Path, config=None):
    """`(model, processor)` from a saved model folder (`config`, when given, replaces the folder's). A folder saved
    without a processor (a bare `model.save_pretrained`) gets one built from the model's config.

    The one loader of the commands (demo, predict, app, train, evaluate): a folder that cannot give a working model
    is refused with one line naming the file and the problem, before anything is built from it: a missing folder,
    a config.json with a bad value, damaged or incomplete safetensors, weights of other shapes than the config
    describes, a pickle that is refused, weights that are NaN or infinite, an unreadable processor file."""
    from .configuration_eovseg import EovSegConfig
    from .modeling_eovseg import EovSegForPanopticSegmentation
    from .processing import EovSegProcessor

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} not found.")
    config = config if config is not None else EovSegConfig.from_pretrained(folder)
    check_weight_files(folder, config)
    model = EovSegForPanopticSegmentation.from_pretrained(folder, config=config)
    check_finite_weights(model, folder)
    if any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        processor = EovSegProcessor.from_pretrained(folder)
    else:
        processor = EovSegProcessor.from_config(model.config)
    return model, processor


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {err}") from None
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def check_weight_files(folder: Path, config) -> None:
    """Read the headers of a folder's safetensors files: a damaged or incomplete file, or a weight whose shape is not
    the one `config` gives it (the config of another model), is one line naming the file and the weight."""
    import torch
    from safetensors import SafetensorError, safe_open

    from .modeling_eovseg import EovSegForPanopticSegmentation

    files = _safetensors_files(Path(folder))
    if not files:
        return  # no safetensors (pytorch_model.bin, or nothing): from_pretrained says what is wrong
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {name: tuple(t.shape) for name, t in EovSegForPanopticSegmentation(config).state_dict().items()}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (named by {Path(folder) / 'model.safetensors.index.json'}).")
        try:
            with safe_open(str(path), framework="pt") as weights:
                shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise OSError(f"{path} is damaged or incomplete, not a readable safetensors file ({err}).") from None
        for name, shape in shapes.items():
            if name in expected and expected[name] != shape:
                raise ValueError(
                    f"{path}: weight {name!r} has shape {list(shape)} where the folder's config.json gives "
                    f"{list(expected[name])}: the config and the weights are of different models."
                )


def check_finite_weights(model, folder) -> None:
    """Refuse a model with NaN or infinite weights (a diverged training run, a damaged file): it would find no
    segment in any image (or crash in the deformable convolution) instead of saying so."""
    import torch

    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ValueError(f"model folder {str(folder)!r}: weights hold NaN or infinite values ({bad[0]}{more}); "
                         "the model is broken (a diverged training run or a damaged file).")


def push_model_folder(
    folder: str | Path,
    repo_id: str,
    commit_message: str = "Upload EOV-Seg model",
    ignore_patterns: list[str] | None = None,
    allow_patterns: list[str] | None = None,
) -> str:
    """Upload a folder written by [`save_model_folder`] (weights, processor, remote code, model card if any) to the
    Hub repository `repo_id`, creating it if needed, leaving out the paths matching `ignore_patterns` (e.g. training
    checkpoints), and with `allow_patterns` only the paths matching them (a folder shared with the user's own files).
    Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    only = {"allow_patterns": allow_patterns} if allow_patterns is not None else {}
    return str(
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=ignore_patterns,
            **only,
        )
    )


def check_push_access(repo_id: str, option: str = "--push_to_hub") -> None:
    """Refuse at once, before any training or conversion, an upload that cannot happen: a malformed repository id,
    offline mode (`HF_HUB_OFFLINE=1`), no login, or no connection. Raises ValueError (one line)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        raise ValueError(f"{option} {repo_id!r} is not a repository id (user/name): {str(err).splitlines()[0]}") from None
    if constants.is_offline_mode():
        raise ValueError(f"{option} {repo_id}: offline mode (HF_HUB_OFFLINE=1) forbids the upload; unset it or drop "
                         f"{option}.")
    try:
        HfApi().whoami()
    except Exception as err:  # no token, a refused token, no connection: whatever stops the upload later
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{option} {repo_id}: cannot upload ({type(err).__name__}: {first}); log in with "
                         "`hf auth login` and check the connection, or drop the option.") from None
