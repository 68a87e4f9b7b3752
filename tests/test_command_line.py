"""The argument types every command shares (`eovseg.command_line`)."""

import pytest

from eovseg.cli import main as cli_main


@pytest.mark.parametrize(
    "argv, option",
    [
        (["demo", "--vocabulary", ""], "--vocabulary"),
        (["demo", "--classes", "cup", " "], "--classes"),
        (["predict", "photo.jpg", "--output_dir", "out", "--vocabulary", ""], "--vocabulary"),
        (["predict", "photo.jpg", "--output_dir", "out", "--classes", ""], "--classes"),
        (["predict", "photo.jpg", "--output_dir", "out", "--classes", "car", "--stuff", ""], "--stuff"),
    ],
)
def test_empty_vocabulary_or_class_is_a_usage_error(argv, option, tmp_path, monkeypatch, capsys):
    # Before: an empty --vocabulary / --classes was taken for "not given" and the default vocabulary was used.
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must not be empty" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
