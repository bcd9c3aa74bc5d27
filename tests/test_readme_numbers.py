"""Every number in README.md and docs/*.md comes from a committed results file (issue 19, item 2).

(a) Every `<!-- results: NAME -->` block equals what `benchmarks/readme_tables.py` renders from the committed files
    (`python benchmarks/readme_tables.py` rewrites them after a study is re-run).
(b) Every number in a markdown table, inside the blocks or not, appears at its printed precision among the numbers
    of the results files under `benchmarks/` (json and md); setting columns (target, budget, batch, seeds, lr,
    threshold, ...), the row-name column and tables marked `<!-- numbers: not measured: why -->` aside.
"""

import importlib.util
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def _load_tables():
    sys.path.insert(0, str(BENCHMARKS))  # readme_tables imports make_results_table, its sibling
    try:
        spec = importlib.util.spec_from_file_location("readme_tables", BENCHMARKS / "readme_tables.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


tables = _load_tables()
DOCUMENTS = tables.DOCUMENTS


@pytest.fixture(scope="module")
def sources():
    return tables.source_numbers(BENCHMARKS)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_marked_blocks_equal_the_rendering_of_the_committed_files(path):
    text = path.read_text()
    assert tables.render_blocks(text) == text, (
        f"{path.name}: a results block differs from the committed results files; run "
        "`python benchmarks/readme_tables.py`"
    )


def test_the_documents_carry_results_blocks():
    names = {match["name"] for path in DOCUMENTS for match in tables.BLOCK.finditer(path.read_text())}
    assert names == set(tables.RENDERERS), sorted(set(tables.RENDERERS) ^ names)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_every_table_number_is_in_a_results_file(path, sources):
    missing = tables.unbacked_numbers(path.read_text(), sources)
    assert not missing, f"{path.name}: numbers in no committed results file (line: number (column)): {missing}"


SYNTHETIC = """
Text 0.123 outside a table is not checked.

| model | batch | accuracy | compute | target |
|---|---|---|---|---|
| ViT/16, lr 1e-3 | 32 | 0.894 ± 0.011 | 0.455 [0.450-0.460] | fine 0.25 |
| MSViT | 1 | 0.777 | 1.35x | >= 0.93 |

<!-- numbers: not measured: quoted from a paper -->
| variant | GMACs |
|---|---|
| b2 | 3.8 |

| phase | what |
|---|---|
| joint | hidden 96, 3 layers |
"""


def test_the_checker_finds_a_number_that_no_file_holds():
    sources = {"0.894", "0.011", "0.455", "0.450", "0.460", "1.35"}
    assert tables.unbacked_numbers(SYNTHETIC, sources) == ["7: 0.777 (accuracy)"]
    assert tables.unbacked_numbers(SYNTHETIC, sources | {"0.777"}) == []
    # one more digit is another number: 0.4550 is not what a file holding 0.455 printed
    assert tables.unbacked_numbers(SYNTHETIC.replace("0.455 [", "0.4551 ["), sources | {"0.777"}) == [
        "6: 0.4551 (compute)"
    ]


def test_the_checker_reads_numbers_as_printed():
    assert tables.numbers_in("0.881 [0.864-0.890], -0.008, +0.001, 1.70x, 45.5%, ViT/16, b1, `0.5`, 2e-3") == [
        "0.881", "0.864", "0.890", "-0.008", "+0.001", "1.70", "45.5%",
    ]  # fmt: skip
    forms = tables.printed_forms(0.45539)
    assert {"0.455", "0.46", "0.4554"} <= forms and "0.454" not in forms
    assert tables.backed("45.5%", forms)


def test_a_stale_block_is_rewritten_and_reported(tmp_path, monkeypatch):
    stale = tmp_path / "README.md"
    stale.write_text("intro\n<!-- results: dit-recipes -->\n| old | table |\n<!-- /results -->\nend\n")
    monkeypatch.setattr(tables, "DOCUMENTS", [stale])
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    assert tables.main(["--check"]) == 1
    assert "| old | table |" in stale.read_text()
    assert tables.main([]) == 0
    assert "| old | table |" not in stale.read_text() and "sparse training" in stale.read_text()
    assert tables.main(["--check"]) == 0
