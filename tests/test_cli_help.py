"""`eovseg --help` and every `eovseg COMMAND --help`: the eovseg usage line, every option explained, and no torch or
transformers imported to print them (`benchmarks/cli_help.py` measures the time); `import eovseg` stays light and
still registers the Auto classes and the pipeline once transformers is imported."""

import argparse
import os
import subprocess
import sys
import textwrap

import pytest

from eovseg.cli import COMMANDS, command_parser, main


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_has_the_eovseg_usage_line_and_explains_every_option(name, capsys):
    assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: eovseg {name} ")
    assert f"eovseg {name}: error: ..." in text  # the one error format, stated in every help
    assert "python -m" not in text.split("\n\n")[0]
    for action in command_parser(name)._actions:
        assert action.help and action.help != argparse.SUPPRESS, f"eovseg {name}: {action.dest} has no help"
        shown_default = action.default not in (None, False, []) and action.option_strings
        if shown_default and not isinstance(action, argparse._HelpAction):
            assert "default" in command_parser(name)._get_formatter()._get_help_string(action), action.dest


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: eovseg <command> [options]")
    assert all(f"  {name} " in text for name in COMMANDS)
    assert main(["segment"]) == 2
    assert "eovseg: error: unknown command 'segment' (choose from demo, " in capsys.readouterr().err


def test_help_and_usage_errors_import_neither_torch_nor_transformers():
    probe = textwrap.dedent(f"""
        import sys
        import eovseg
        from eovseg.cli import COMMANDS, main
        statuses = [main(["--help"])] + [main([name, "--help"]) for name in COMMANDS] + [main(["train"])]
        print(statuses, sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == f"{[0] * (len(COMMANDS) + 1) + [2]} []"


@pytest.mark.parametrize("first", [
    "import eovseg; from transformers import pipeline",             # the README's order
    "from eovseg.modeling_eovseg import EovSegForPanopticSegmentation",  # an eovseg module brings transformers in
    "from eovseg import EovSegConfig",                                 # a lazy attribute
])
def test_registration_happens_whatever_is_imported_first(first):
    probe = first + textwrap.dedent("""
        from transformers import AutoConfig, AutoModelForUniversalSegmentation
        from transformers.pipelines import PIPELINE_REGISTRY
        config = AutoConfig.for_model("eovseg")
        print(type(config).__name__, AutoModelForUniversalSegmentation._model_mapping[type(config)].__name__,
              "open-vocabulary-segmentation" in PIPELINE_REGISTRY.get_supported_tasks())
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["EovSegConfig", "EovSegForPanopticSegmentation", "True"]


def test_preset_names_of_the_parsers_are_the_configurations():
    from eovseg.configuration_eovseg import PRESETS
    from eovseg.parsers import PRESET_NAMES

    assert list(PRESET_NAMES) == list(PRESETS)


def test_docs_commands_page_names_every_command_and_option():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "commands.md").read_text(encoding="utf-8")
    for name in COMMANDS:
        assert f"## eovseg {name}" in page
        section = page.split(f"## eovseg {name}", 1)[1].split("\n## ", 1)[0]
        for action in command_parser(name)._actions:
            for option in action.option_strings:
                assert option in ("-h", "--help") or f"`{option}`" in section, f"docs/commands.md: eovseg {name} {option}"


REGISTERED_PROBE = textwrap.dedent("""
    from transformers import AutoConfig, AutoModelForUniversalSegmentation
    from transformers.pipelines import PIPELINE_REGISTRY
    config = AutoConfig.for_model("eovseg")
    print(type(config).__name__, AutoModelForUniversalSegmentation._model_mapping[type(config)].__name__,
          "open-vocabulary-segmentation" in PIPELINE_REGISTRY.get_supported_tasks())
""")


def test_registration_in_an_install_of_pyc_files(tmp_path):
    # An install that ships .pyc files only: its modules come with SourcelessFileLoader, not SourceFileLoader, and an
    # eovseg module that brings transformers in must still register once it is executed, not half-way through.
    # modeling_eovseg keeps its source: transformers' docstring decorators read the source of what they decorate.
    import compileall
    import shutil
    from pathlib import Path

    import eovseg

    copy = tmp_path / "eovseg"
    shutil.copytree(Path(eovseg.__file__).parent, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    assert compileall.compile_dir(copy, legacy=True, quiet=1)
    for source in copy.rglob("*.py"):
        if source.name != "modeling_eovseg.py":
            source.unlink()
    probe = textwrap.dedent("""
        import importlib.machinery
        import eovseg.configuration_eovseg
        loader = eovseg.configuration_eovseg.__spec__.loader
        assert isinstance(loader, importlib.machinery.SourcelessFileLoader), loader
        assert eovseg.configuration_eovseg.__file__.startswith({root!r}), eovseg.configuration_eovseg.__file__
    """).format(root=str(tmp_path)) + REGISTERED_PROBE
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["EovSegConfig", "EovSegForPanopticSegmentation", "True"]


def test_a_lazy_class_registers_whatever_loaded_its_module():
    # The import watcher swaps file loaders only; without it (a module loaded some other way), the first use of a class
    # through the package's lazy attributes registers.
    probe = textwrap.dedent("""
        import sys
        import eovseg
        from eovseg import auto_registration
        sys.meta_path.remove(auto_registration._watcher)
        eovseg.EovSegConfig
    """) + REGISTERED_PROBE
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["EovSegConfig", "EovSegForPanopticSegmentation", "True"]
