"""Property-based fuzzing of the data loaders, --config files and adapter loading.

Each generated case must end in a clear error (DataError / ValueError / FileNotFoundError) or a
correct load: never another exception, never a load of something that is not what was saved.
"""

import json
import math
import shutil
from collections import Counter

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from csreft.cli import command_parser
from csreft.cli.config_file import read_options_file as _read_options_file
from csreft.config import CSReftConfig
from csreft.data import DataError, load_records
from csreft.model import CSReftModel
from csreft.training.options import DEFAULTS, split_options


def read_options_file(path):
    return _read_options_file(path, command_parser("train"))

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# -- mutations -----------------------------------------------------------------------------------
mutation = st.tuples(st.sampled_from(["flip", "delete", "insert", "truncate"]), st.floats(0, 1),
                     st.integers(1, 255))


def mutate(data: bytes, ops) -> bytes:
    data = bytearray(data)
    for op, where, byte in ops:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "flip" and data:
            data[i] ^= byte
        elif op == "delete" and data:
            del data[i]
        elif op == "insert":
            data.insert(i, byte)
        elif op == "truncate":
            del data[i:]
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def report(name, seen):
    print(f"\n{name}: {sum(seen.values())} cases: {dict(seen)}")


# -- data files ----------------------------------------------------------------------------------
VALID = {
    "a.json": json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5", "skill": "math"},
                          {"instruction": "Say hi", "output": "hi", "answer": "hi"}]),
    "b.jsonl": "".join(json.dumps(r) + "\n" for r in [
        {"prompt": "reverse abc", "response": "cba", "skill": "reverse"},
        {"prompt": "pick", "response": "yes", "choices": ["yes", "no"]}]),
    "c.jsonl": json.dumps({"messages": [{"role": "system", "content": "Be terse."},
                                        {"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Yo"}]}) + "\n",
}
WORDS = st.sampled_from(["hi", "reverse abc", "cba", "yes", "no", " "])
FIELDS = ["prompt", "response", "instruction", "input", "output", "messages", "skill", "answer", "choices", "role",
          "content", "system", "data"]


def check_records(records):
    """A load is correct only if every record is usable as documented."""
    assert isinstance(records, list) and records
    for r in records:
        for key in ("prompt", "response"):
            assert isinstance(r[key], str) and r[key].strip()
            r[key].encode("utf-8")
        assert r["skill"] is None or (isinstance(r["skill"], str) and r["skill"].strip())
        assert r["system"] is None or isinstance(r["system"], str)
        if "choices" in r:
            assert r["response"] in r["choices"] and all(isinstance(c, str) for c in r["choices"])


def load_outcome(path) -> str:
    try:
        records = load_records(str(path))
    except DataError as err:
        assert str(path.name) in str(err), err  # the message names the file
        return "refused"
    check_records(records)
    return "loaded"


def test_fuzz_data_files(tmp_path):
    seen = Counter()

    @FUZZ
    @given(name=st.sampled_from(sorted(VALID)), ops=st.lists(mutation, min_size=1, max_size=2))
    def mutated_bytes(name, ops):
        path = tmp_path / name
        path.write_bytes(mutate(VALID[name].encode(), ops))
        seen[load_outcome(path)] += 1

    @FUZZ
    @given(records=st.lists(st.dictionaries(st.sampled_from(FIELDS), WORDS | json_values | st.lists(WORDS) | st.lists(
        st.dictionaries(st.sampled_from(["role", "content"]), st.sampled_from(["user", "assistant", "system", "x", ""]) | json_values)),
        max_size=5) | json_values, min_size=0, max_size=3), jsonl=st.booleans())
    def structured(records, jsonl):
        path = tmp_path / ("s.jsonl" if jsonl else "s.json")
        text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records)
        path.write_text(text)
        seen[load_outcome(path)] += 1

    mutated_bytes()
    structured()
    report("data files", seen)
    assert seen["loaded"] > 0 and seen["refused"] > 0


def test_lone_surrogates_are_refused(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "a\\ud800b", "response": "x"}\n')
    with pytest.raises(DataError, match="s.jsonl: line 1: field 'prompt' is not valid Unicode"):
        load_records(str(path))


# -- --config files ------------------------------------------------------------------------------
KNOWN = sorted(set(DEFAULTS) | set(CSReftConfig.__dataclass_fields__) - {"format_version"})
option_values = (st.none() | st.booleans() | st.integers(-5, 10**30) | st.floats(allow_nan=True) | st.text(max_size=8)
                 | st.sampled_from(["2e-3", "false", "True", "no", "1", "0", "nan", "inf", "-1", "3,9", "f3+l3", "cosine"])
                 | st.lists(st.integers(-2, 40), max_size=3) | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def config_outcome(path) -> str:
    try:
        opts = read_options_file(str(path))
    except ValueError as err:  # ConfigFileError, DataError (not UTF-8)
        assert path.name in str(err), err
        return "refused"
    for key, value in opts.items():  # typed as the flags type them
        kind = type(DEFAULTS.get(key, CSReftConfig.__dataclass_fields__.get(key) and getattr(CSReftConfig(), key)))
        if key in ("layers", "base_shape", "resume", "model", "data", "eval_data", "max_examples",
                   "router_layer", "router_hidden"):
            continue
        if kind in (bool, int):
            assert type(value) is kind, (key, value)
        elif kind is float:
            assert isinstance(value, float), (key, value)
        elif kind is str:
            assert isinstance(value, str), (key, value)
    try:  # and then checked as the flags' values are
        training, config_fields = split_options({"data": "x.jsonl", **opts})
        CSReftConfig(**config_fields)
    except ValueError:
        return "parsed, then refused"
    return "accepted"


def test_fuzz_config_files(tmp_path):
    seen = Counter()

    @FUZZ
    @given(options=st.dictionaries(st.sampled_from(KNOWN) | st.text(min_size=1, max_size=10), option_values,
                                   max_size=5), as_yaml=st.booleans())
    def structured(options, as_yaml):
        path = tmp_path / ("run.yaml" if as_yaml else "run.json")
        path.write_text(yaml.safe_dump(options) if as_yaml else json.dumps(options))
        seen[config_outcome(path)] += 1

    base = "model: m\nlr: 2e-3\nbf16: \"false\"\nlayers: [1, 2]\nrank: 2\nmax_steps: 8\nscheduler: cosine\n"

    @FUZZ
    @given(ops=st.lists(mutation, min_size=1, max_size=4), as_yaml=st.booleans())
    def mutated_bytes(ops, as_yaml):
        text = base if as_yaml else json.dumps(yaml.safe_load(base))
        path = tmp_path / ("m.yaml" if as_yaml else "m.json")
        path.write_bytes(mutate(text.encode(), ops))
        seen[config_outcome(path)] += 1

    structured()
    mutated_bytes()
    report("config files", seen)
    assert seen["refused"] and seen["accepted"]


# -- adapters ------------------------------------------------------------------------------------
CONFIG_KEYS = sorted(CSReftConfig.__dataclass_fields__) + ["extra"]


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    from conftest import randomize_edits
    from csreft import get_csreft_model

    path = tmp_path_factory.mktemp("adapter") / "a"
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3"))
    randomize_edits(model, scale=0.5)
    model.save_pretrained(path)
    return path


def edit_json(meta, where, key, value, drop):
    target = meta if where == "top" else meta.setdefault(where, {})
    if not isinstance(target, dict):
        return
    if drop:
        target.pop(key, None)
    else:
        target[key] = value


@pytest.mark.filterwarnings("ignore:.*adapter base")
def test_fuzz_adapter_files(tmp_path, saved_adapter):
    seen = Counter()
    base = tiny_llama()
    saved = load_file(saved_adapter / "csreft_model.safetensors")
    tensor_names = sorted(saved)

    def outcome(path, must_refuse: bool) -> str:
        try:
            model = CSReftModel.from_pretrained(base, path)
        except FileNotFoundError as err:
            assert str(path) in str(err)
            return "refused"
        except ValueError as err:
            assert str(path) in str(err), err  # names the file
            return "refused"
        loaded = model.adapter_state_dict()
        model.remove_hooks()
        assert not must_refuse, "a damaged adapter loaded"
        for name in tensor_names:  # what was saved, exactly
            assert torch.equal(loaded[name], saved[name]), name
        return "loaded intact"

    def fresh():
        path = tmp_path / "case"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(saved_adapter, path)
        return path

    @FUZZ
    @given(file=st.sampled_from(["csreft_model.safetensors", "csreft_config.json"]),
           ops=st.lists(mutation, min_size=1, max_size=3))
    def mutated_bytes(file, ops):
        path = fresh()
        before = (path / file).read_bytes()
        after = mutate(before, ops)
        (path / file).write_bytes(after)
        # changed weights with the checksum in place, or a missing/garbled checksum: refused.
        # (A config edit that keeps the checksum and a valid configuration may load.)
        seen[outcome(path, must_refuse=file.endswith("safetensors") and after != before)] += 1

    @FUZZ
    @given(where=st.sampled_from(["top", "csreft_config", "base_model", "metadata"]),
           key=st.sampled_from(CONFIG_KEYS + ["weights_sha256", "hidden_size", "num_hidden_layers", "csreft_config"]),
           value=option_values, drop=st.booleans())
    def edited_json(where, key, value, drop):
        path = fresh()
        meta = json.loads((path / "csreft_config.json").read_text())
        edit_json(meta, where, key, value, drop)
        (path / "csreft_config.json").write_text(json.dumps(meta))
        seen[outcome(path, must_refuse=False)] += 1

    @FUZZ
    @given(name=st.sampled_from(tensor_names), kind=st.sampled_from(["nan", "inf", "basis", "dtype", "drop", "shape"]),
           factor=st.floats(1.05, 3.0) | st.floats(0.2, 0.95), index=st.integers(0, 10**6))
    def damaged_without_checksum(name, kind, factor, index):
        """Adapters saved before checksums: damage that the contents show must be refused."""
        path = fresh()
        meta = json.loads((path / "csreft_config.json").read_text())
        del meta["weights_sha256"]
        (path / "csreft_config.json").write_text(json.dumps(meta))
        state = {k: v.clone() for k, v in saved.items()}
        t = state[name]
        if kind in ("nan", "inf"):
            t.view(-1)[index % t.numel()] = math.nan if kind == "nan" else -math.inf
        elif kind == "basis":
            name = next(n for n in tensor_names if n.endswith(".basis"))
            state[name] = state[name] * factor
        elif kind == "dtype":
            state[name] = t.to(torch.int64)
        elif kind == "drop":
            del state[name]
        else:
            state[name] = t.flatten()[: max(t.numel() - 1, 1)]
        save_file(state, path / "csreft_model.safetensors")
        seen[outcome(path, must_refuse=True)] += 1

    mutated_bytes()
    edited_json()
    damaged_without_checksum()
    report("adapter files", seen)
    assert all(not h for layer in base.model.layers for h in (layer._forward_hooks, layer._forward_pre_hooks))
    assert seen["refused"] and seen["loaded intact"]
