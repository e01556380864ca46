"""benchmarks/composition.py runs end to end on the tiny model and writes its table."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "composition.py"


@pytest.mark.filterwarnings("ignore")
def test_composition_benchmark_smoke(tmp_path, tiny_model_dir):
    spec = importlib.util.spec_from_file_location("csreft_composition_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "comp"
    module.main(["--model", str(tiny_model_dir), "--output-dir", str(out), "--train-per-skill", "4",
                 "--test-per-skill", "2", "--composed", "3", "--steps", "2", "--specialist-steps", "1",
                 "--router-steps", "2", "--batch-size", "4", "--layers", "1,2", "--rank", "2",
                 "--positions", "f3+l3", "--max-new-tokens", "3", "--removal-skills", "sort,upper"])
    result = json.loads((out / "composition.json").read_text())
    assert set(result["rows"]) == {"base", "supervised-router", "supervised-union", "library-router", "library-union"}
    assert set(result["rows"]["library-union"]["composed"]["per_task"]) == {"reverse+upper", "sentiment+upper",
                                                                          "sort+reverse"}
    assert set(result["removal"]) == {"sort", "upper"} and "gate -1" in result["removal"]["sort"]
    assert result["seconds"]["train library router"] > 0
    table = (out / "composition.md").read_text()
    assert "explicit union" in table and "| reverse+upper |" in table.splitlines()[0] + " |"
