"""tests/models/<name>/ holds the runs of transformers' own common test mixins, laid out as in transformers' tree (the
mixins read the model name from the folder). They need transformers' test sources (scripts/fetch_transformers_tests.py)
and run under their own marker: `pytest -m transformers_common`, or with their path given. Any other run (the
default `-m "not slow"`) does not collect them, so it neither needs the sources nor reports them as skipped."""

from pathlib import Path

from _pytest.mark.expression import Expression

HERE = Path(__file__).resolve().parent
MARKER = "transformers_common"


def _selected(config) -> bool:
    markexpr = config.option.markexpr
    if markexpr:
        # collected when the expression depends on the marker and picks the tests that carry it
        evaluate = Expression.compile(markexpr).evaluate
        return evaluate(lambda name, **_: name == MARKER) and not evaluate(lambda name, **_: False)
    return any(HERE in (Path(arg.split("::")[0]).resolve(), *Path(arg.split("::")[0]).resolve().parents)
               for arg in config.args)


def pytest_ignore_collect(collection_path, config):
    if collection_path.resolve().parent == HERE and collection_path.is_dir() and not _selected(config):
        return True
    return None

