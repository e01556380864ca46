"""benchmarks/composition.py runs end to end on the tiny model and writes its table."""

import json

import pytest

from conftest import load_benchmark
from csreft.evaluation.suites import builtin_suite, check_answer


def load_module():
    return load_benchmark("composition")


def test_component_answers_are_each_skill_alone():
    module = load_module()
    composed = {r["skill"]: r for r in builtin_suite(0, 2, 2, 3).composed}
    word = composed["reverse+upper"]["input"]
    assert module.component_answers(composed["reverse+upper"]) == [(word[::-1], "exact"), (word.upper(), "exact")]
    record = composed["sentiment+upper"]
    assert module.component_answers(record)[0] == (record["response"].lower(), "exact")
    record = composed["sort+reverse"]
    (sort, kind), (rev, _) = module.component_answers(record)
    nums = [int(n) for n in record["input"].split()]
    assert check_answer(kind, sort, " ".join(map(str, sorted(nums))))
    assert check_answer(kind, rev, " ".join(map(str, nums[::-1])))
    assert not check_answer(kind, sort, record["response"])  # the composed answer is not one part


@pytest.mark.filterwarnings("ignore")
def test_composition_benchmark_smoke(tmp_path, tiny_model_dir):
    module = load_module()
    out = tmp_path / "comp"
    argv = ["--model", str(tiny_model_dir), "--output-dir", str(out), "--train-per-skill", "4",
            "--test-per-skill", "2", "--composed", "3", "--steps", "2", "--specialist-steps", "1",
            "--router-steps", "2", "--batch-size", "4", "--layers", "1,2", "--rank", "2",
            "--positions", "f3+l3", "--max-new-tokens", "3", "--removal-skills", "sort,upper"]
    module.main(argv)
    result = json.loads((out / "composition.json").read_text())
    assert set(result["rows"]) == {"base", "supervised-router", "supervised-union", "supervised-union-0.5",
                                   "supervised-union-chosen", "library-router", "library-union", "library-union-0.5",
                                   "library-union-chosen"}
    choice = result["gate_choice"]["library"]
    assert len(choice["validation"]) == 9 and set(choice["chosen"]) == {"reverse+upper", "sentiment+upper", "sort+reverse"}
    assert all(a in (0.5, 1, 1.5) and b in (0.5, 1, 1.5) for a, b in choice["chosen"].values())
    assert "test" not in result["rows"]["library-union-0.5"] and 0 <= result["rows"]["base"]["composed"]["one_part"] <= 1
    assert set(result["rows"]["library-union"]["composed"]["per_task"]) == {"reverse+upper", "sentiment+upper",
                                                                          "sort+reverse"}
    assert set(result["removal"]) == {"sort", "upper"} and "gate -1" in result["removal"]["sort"]
    assert result["seconds"]["train library router"] > 0
    table = (out / "composition.md").read_text()
    assert "explicit union" in table and "| reverse+upper |" in table.splitlines()[0] + " |"

    # --reuse scores again without training: the adapters are the same files
    adapter = out / "supervised" / "adapter" / "csreft_model.safetensors"
    before = adapter.stat().st_mtime_ns
    module.main(argv + ["--reuse", "--union-gates", "1"])
    assert adapter.stat().st_mtime_ns == before
    assert "supervised-union-0.5" not in json.loads((out / "composition.json").read_text())["rows"]
    # ... and refuses adapters trained with other arguments
    with pytest.raises(SystemExit, match="steps: 2 there, 3 now"):
        module.main([*argv[:argv.index("--steps")], "--steps", "3", *argv[argv.index("--steps") + 2:], "--reuse"])


def test_union_gates_put_each_tasks_pair_on_its_skills_in_order():
    from types import SimpleNamespace
    module = load_module()
    model = SimpleNamespace(csreft_config=SimpleNamespace(num_subspaces=3), skill_names=["a", "b", "c"])
    records = [{"skill": "c+a", "skills": ["c", "a"]}, {"skill": "a+b", "skills": ["a", "b"]}]
    assert module.union_gates(model, records, 0.5).tolist() == [[0.5, 0, 0.5], [0.5, 0.5, 0]]
    assert module.union_gates(model, records, {"c+a": (2, -1), "a+b": (1, 0)}).tolist() == [[-1, 0, 2], [1, 0, 0]]
