from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="eovseg",
    version="0.1.0",
    description="EOV-Seg open-vocabulary panoptic segmentation as a Hugging Face Transformers model",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["eovseg", "eovseg.*"]),
    package_data={"eovseg": ["assets/*", "assets/*/*", "evaluation/*.py", "vocabularies/*.json", "vocabularies/*.md"]},
    # Ranges, not pins (a library must not fix its users' environments); upper bounds at the next major version.
    # docs/getting_started.md, "Dependencies", says which lower bounds the test suite ran with.
    install_requires=[
        "torch>=2.14,<3",
        "torchvision>=0.29,<1",
        "transformers>=5.23,<6",
        "open_clip_torch>=3.3,<4",
        "timm>=1.0.17,<2",  # open_clip_torch 3.3 needs it
        "huggingface_hub>=1.31,<3",
        "accelerate>=1.15,<2",  # 1.14 resumes a run with another loss; 1.2 lacks what the Trainer calls
        "datasets>=3.0,<6",
        "evaluate>=0.4,<0.5",
        "numpy>=1.24,<3",
        "scipy>=1.10,<2",
        "pillow>=10.3,<13",  # 16-bit PNGs open as I;16 (before 10.3 as I, unscalable)
        "safetensors>=0.8",  # transformers 5.23 needs it
        "tqdm>=4.66.3,<5",  # datasets 3.0 needs it
        "pycocotools>=2.0.7,<3",
        "regex>=2025.10.22",  # the CLIP tokenizer's pattern; transformers 5.23 needs it
        "ftfy>=6.1,<7",  # the CLIP tokenizer's text cleaning
        "av>=12",  # video in and out for `eovseg predict`; its wheels carry FFmpeg
    ],
    extras_require={
        # parameterized: transformers' common test mixins (pytest -m transformers_common) import it
        # gradio: the web page's handler tests (tests/test_app.py) run in the default test run, not skipped
        # onnx, onnxruntime, onnxscript (torch.onnx's exporter), openvino, nncf: the export tests (tests/test_runtime.py)
        "test": ["pytest>=8", "supervision>=0.26", "parameterized>=0.9", "gradio>=6,<7", "onnx>=1.18",
                 "onnxruntime>=1.31", "onnxscript>=0.5", "openvino>=2025.2", "nncf>=2.17"],
        # `eovseg export --format onnx` and `eovseg.runtime` on ONNX Runtime (int8: onnxruntime.quantization)
        "onnx": ["onnx>=1.18", "onnxruntime>=1.31", "onnxscript>=0.5"],
        # `eovseg export --format openvino` (converted from the ONNX graphs) and int8 through NNCF
        "openvino": ["onnx>=1.18", "onnxscript>=0.5", "openvino>=2025.2", "nncf>=2.17"],
        "app": ["gradio>=6,<7"],
        "supervision": ["supervision>=0.26"],
        # the web demo's browser test (Chromium itself comes from Debian: apt-get install chromium)
        "browser": ["gradio>=6,<7", "playwright>=1.40"],
        # the documentation site (docs/, mkdocs.yml); mkdocs 1.6 for the link and anchor validation settings
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10"],
    },
    entry_points={"console_scripts": ["eovseg=eovseg.cli:main"]},
)
