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
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "transformers==5.23.0",
        "open_clip_torch==3.3.0",
        "timm>=1.0,<2",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "scipy>=1.10",
        "pillow>=10",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pycocotools>=2.0.7",
        "av>=12",  # video in and out for `eovseg predict`; its wheels carry FFmpeg
    ],
    extras_require={
        "test": ["pytest>=8", "supervision>=0.26"],
        "app": ["gradio>=6,<7"],
        "supervision": ["supervision>=0.26"],
        # the web demo's browser test (Chromium itself comes from Debian: apt-get install chromium)
        "browser": ["gradio>=6,<7", "playwright>=1.40"],
    },
    entry_points={"console_scripts": ["eovseg=eovseg.cli:main"]},
)
