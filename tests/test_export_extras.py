"""Export and runtime without their optional packages: one line naming what is missing and the extra to install,
nothing written (the `onnx` / `openvino` extras are not in a plain `pip install eovseg`)."""

import pytest

from eovseg import onnx_export
from eovseg.onnx_export import main as export_main
from eovseg.runtime import ExportFolderError, _import_runtime

DEMO_MODEL = onnx_export.Path(onnx_export.__file__).with_name("assets") / "demo_model"


@pytest.mark.parametrize("argv, missing, message", [
    ([], {"onnxscript"}, "--format onnx needs onnxscript, not installed: pip install 'eovseg[onnx]'."),
    (["--format", "openvino", "--precision", "int8"], {"openvino", "nncf"},
     "--format openvino needs openvino, nncf, not installed: pip install 'eovseg[openvino]'."),
    (["--precision", "int8"], {"onnxruntime", "nncf"},
     "--format onnx needs onnxruntime, not installed: pip install 'eovseg[onnx]'."),
])
def test_export_names_the_missing_packages(argv, missing, message, monkeypatch, tmp_path, capsys):
    # every optional package present but `missing`, whatever this environment has installed
    monkeypatch.setattr(onnx_export, "_installed", lambda name: name not in missing)
    output = tmp_path / "export"
    assert export_main([str(DEMO_MODEL), "--output_dir", str(output), *argv]) == 1
    assert capsys.readouterr().err.strip() == f"eovseg export: error: {message}"
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_runtime_names_its_missing_package():
    with pytest.raises(ExportFolderError) as error:
        _import_runtime("eovseg_no_such_runtime", "onnx")
    assert str(error.value) == ("running an export with eovseg_no_such_runtime needs eovseg_no_such_runtime, not "
                                "installed: pip install 'eovseg[onnx]'.")


def test_installed_packages_are_found():
    assert onnx_export._installed("numpy") and not onnx_export._installed("eovseg_no_such_package")
