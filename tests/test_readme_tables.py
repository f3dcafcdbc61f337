"""The README's result tables are exactly what benchmarks/tables.py renders from benchmarks/results/."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_the_results():
    tables = _tables()
    readme = (ROOT / "README.md").read_text()
    assert set(m.group(2) for m in tables.BLOCK.finditer(readme)) == set(tables.TABLES)
    assert tables.render(readme) == readme, "README tables are stale: run python benchmarks/tables.py --write"


def test_a_changed_number_is_caught(tmp_path, monkeypatch):
    tables = _tables()
    readme = tables.render((ROOT / "README.md").read_text())
    tampered = readme.replace("| sparsegpt | ", "| sparsegpt | 1.0 ", 1)
    assert tampered != readme and tables.render(tampered) != tampered


def test_the_orderings_the_readme_states_hold_in_the_results():
    import json

    ppl = json.loads((ROOT / "benchmarks" / "results" / "prune_quality.json").read_text())["perplexity"]
    for pattern in ("2:4", "4:8", "unstructured"):
        assert ppl[f"sparsegpt/{pattern}"] < ppl[f"wanda/{pattern}"] < ppl[f"magnitude/{pattern}"] / 4
    for method in ("magnitude", "wanda", "sparsegpt"):
        assert ppl[f"{method}/unstructured"] < ppl[f"{method}/4:8"] < ppl[f"{method}/2:4"]
    assert ppl["dense"] < min(v for k, v in ppl.items() if k != "dense")
