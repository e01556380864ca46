"""Libraries that route themselves: signatures (prompt statistics stored by `csreft train`),
data-free prototypes, calibration files, and growing a library with --add."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize_edits
from csreft import CSReftConfig, CSReftModel, get_csreft_model
from csreft.cli import main
from csreft.signatures import LibraryRouter, fit, log_likelihood, prototypes, stack

# three skills whose prompts differ in what they ask and in their inputs
SKILLS = {"reverse": ("reverse the word", lambda w: w[::-1]), "double": ("say twice", lambda w: w + w),
          "upper": ("capitalise", lambda w: w.upper())}
WORDS = ["abc", "dog", "cat", "sun", "map", "pen", "cup", "hat", "box", "ink"]


def _data(path, skills, words=WORDS):
    path.write_text("".join(json.dumps({"prompt": f"{SKILLS[s][0]}: {w}", "response": SKILLS[s][1](w), "skill": s})
                            + "\n" for s in skills for w in words))
    return path


@pytest.fixture(scope="module")
def specialists(tmp_path_factory, tiny_model_dir):
    """One LoReFT per skill, trained by `csreft train` (4 steps): each stores its signature."""
    root = tmp_path_factory.mktemp("specialists")
    for skill in SKILLS:
        main(["train", "--data", str(_data(root / f"{skill}.jsonl", [skill])), "--model", str(tiny_model_dir),
              "--output-dir", str(root / skill), "--num-subspaces", "1", "--no-use-router", "--layers", "1,2",
              "--rank", "2", "--positions", "f3+l3", "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2"])
    return root


def _batch(model_dir, skills, words=WORDS):
    from csreft.base_models import load_base
    from csreft.data import encode_example, pad_batch

    _, tok = load_base(str(model_dir))
    enc = [encode_example(tok, f"{SKILLS[s][0]}: {w}") for s in skills for w in words]
    return pad_batch(enc, tok.pad_token_id, side="left")


def _load(model_dir, adapter):
    from transformers import AutoModelForCausalLM

    return CSReftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)


# -- the math -------------------------------------------------------------------------------------
def test_log_likelihood_is_the_gaussian_density_of_the_ppca_model():
    torch.manual_seed(0)
    d, m = 12, 3
    sig = fit(torch.randn(200, d) @ torch.randn(d, d) + 3.0, rank=m)
    u = sig["basis"].double()
    cov = u @ torch.diag(sig["variances"].double()) @ u.T + sig["residual"].double() * (torch.eye(d) - u @ u.T)
    x = torch.randn(5, d) * 2
    want = torch.distributions.MultivariateNormal(sig["mean"].double(), cov).log_prob(x.double())
    got = log_likelihood(stack([sig]), x)[:, 0].double() - 0.5 * d * math.log(2 * math.pi)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)
    assert torch.allclose(u.T @ u, torch.eye(m, dtype=torch.float64), atol=1e-5)


def test_signatures_separate_clusters_and_gates_are_exact_one_hot_or_renormalised():
    torch.manual_seed(1)
    centres = torch.randn(4, 16) * 3
    train = [centres[i] + torch.randn(50, 16) for i in range(4)]
    table = stack([fit(t) for t in train])
    labels = torch.arange(4).repeat_interleave(20)
    x = centres[labels] + torch.randn(80, 16)
    assert (log_likelihood(table, x).argmax(1) == labels).float().mean() >= 0.95
    hidden, starts, ends = x[:, None, :], torch.zeros(80, dtype=torch.long), torch.ones(80, dtype=torch.long)
    gates, probs = LibraryRouter("signatures")(hidden, starts, ends, table)
    assert set(gates.flatten().tolist()) == {0.0, 1.0} and torch.equal(gates.sum(1), torch.ones(80))
    two, _ = LibraryRouter("signatures", temperature=1e4, top_k=2)(hidden, starts, ends, table)
    assert ((two > 0).sum(1) == 2).all() and torch.allclose(two.sum(1), torch.ones(80))
    with pytest.raises(ValueError, match="one of signatures, prototypes"):
        LibraryRouter("learned")


def test_prototypes_are_the_direction_each_edit_reads_and_zero_for_a_null_edit():
    torch.manual_seed(2)
    d, r = 10, 2
    q = torch.linalg.qr(torch.randn(2, d, r))[0]
    v = torch.nn.functional.normalize(torch.randn(d), dim=0)
    w0 = q[0].T + 3.0 * torch.randn(r, 1) @ v[None]  # W - R = a v^T: reads along v only
    w1 = q[1].T.clone()  # W = R: a null edit
    p = prototypes(q, torch.cat([w0, w1]))
    assert torch.allclose(p[0].abs(), v.abs(), atol=1e-5) and torch.equal(p[1], torch.zeros(d))


# -- signatures from csreft train, and a library that routes by them ------------------------------
def test_train_stores_a_signature_of_its_prompts(specialists):
    state = load_file(specialists / "reverse" / "adapter" / "csreft_model.safetensors")
    meta = json.loads((specialists / "reverse" / "adapter" / "csreft_config.json").read_text())
    assert state["signature.mean"].shape == (1, 64) and state["signature.basis"].shape[:2] == (1, 64)
    assert meta["signature"]["layer"] == 1 and meta["signature"]["prompts"] == [len(WORDS)]
    summary = json.loads((specialists / "reverse" / "summary.json").read_text())
    assert summary["signatures"].startswith("stored")


@pytest.mark.parametrize("routing", ["signatures", "prototypes"])
def test_a_library_routes_itself_and_gives_each_routed_input_its_specialists_logits(
        specialists, tiny_model_dir, tmp_path, routing):
    lib = tmp_path / "lib"
    main(["compose", "--adapters", ",".join(str(specialists / s / "adapter") for s in SKILLS),
          "--output-dir", str(lib), "--routing", routing])
    model = _load(tiny_model_dir, lib)
    assert model.csreft_config.routing == routing and model.skill_names == list(SKILLS)
    b = _batch(tiny_model_dir, SKILLS)
    gates = model.route(b["input_ids"], b["attention_mask"], b["prompt_starts"])
    own = torch.arange(len(SKILLS)).repeat_interleave(len(WORDS))
    accuracy = float((gates.argmax(1) == own).float().mean())
    if routing == "signatures":  # the prompts the signatures were made of
        assert accuracy == 1.0
    assert set(gates.flatten().tolist()) <= {0.0, 1.0}
    routed = model(**{k: b[k] for k in ("input_ids", "attention_mask", "prompt_starts")}).logits
    explicit = model(**{k: b[k] for k in ("input_ids", "attention_mask", "prompt_starts")}, gates=gates).logits
    assert torch.equal(routed, explicit)
    i = 0  # the first reverse prompt, against the reverse specialist alone
    alone = _load(tiny_model_dir, specialists / model.skill_names[int(gates[i].argmax())] / "adapter")
    single = alone(input_ids=b["input_ids"][:1], attention_mask=b["attention_mask"][:1],
                   prompt_starts=b["prompt_starts"][:1]).logits
    assert torch.allclose(routed[:1], single, atol=1e-5)


def test_signature_routing_survives_save_and_load(specialists, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    dirs = [specialists / s / "adapter" for s in SKILLS]
    made = CSReftModel.from_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), dirs, routing="signatures")
    made.save_pretrained(tmp_path / "lib", metadata=made.composition)
    loaded = _load(tiny_model_dir, tmp_path / "lib")
    b = _batch(tiny_model_dir, SKILLS)
    args = (b["input_ids"], b["attention_mask"], b["prompt_starts"])
    assert torch.equal(made.route(*args), loaded.route(*args))
    for key in made.signature_table:
        assert torch.equal(made.signature_table[key], loaded.signature_table[key])


def test_growing_a_library_keeps_every_old_skill_bit_identical(specialists, tiny_model_dir, tmp_path):
    lib, grown = tmp_path / "lib", tmp_path / "grown"
    main(["compose", "--adapters", f"{specialists / 'reverse' / 'adapter'},{specialists / 'double' / 'adapter'}",
          "--output-dir", str(lib), "--routing", "signatures"])
    main(["compose", "--library", str(lib), "--add", str(specialists / "upper" / "adapter"), "--output-dir", str(grown)])
    old, new = _load(tiny_model_dir, lib), _load(tiny_model_dir, grown)
    assert new.skill_names == ["reverse", "double", "upper"] and new.csreft_config.routing == "signatures"
    b = _batch(tiny_model_dir, SKILLS)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "prompt_starts")}
    for skill in ("reverse", "double"):
        assert torch.equal(old(**inputs, skills=skill).logits, new(**inputs, skills=skill).logits)
    n = 2 * len(WORDS)  # the old skills' prompts keep their own top gate
    top_old = old.route(*inputs.values())[:n].argmax(1)
    top_new = new.route(*inputs.values())[:n].argmax(1)
    assert torch.equal(top_old, top_new)
    # in place: the library itself is replaced, atomically, by the grown one; a user's file in
    # it is never deleted silently
    grow = ["compose", "--library", str(lib), "--add", str(specialists / "upper" / "adapter"), "--output-dir", str(lib)]
    (lib / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="notes.txt"):
        main(grow)
    assert (lib / "notes.txt").read_text() == "mine" and _load(tiny_model_dir, lib).skill_names == ["reverse", "double"]
    (lib / "notes.txt").unlink()
    main(grow)
    assert _load(tiny_model_dir, lib).skill_names == ["reverse", "double", "upper"]


def test_calibration_supplies_signatures_for_adapters_without_them(specialists, tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"  # as a pyreft import would be: no signature tensors
    bare.mkdir()
    src = specialists / "upper" / "adapter"
    state = {k: v for k, v in load_file(src / "csreft_model.safetensors").items() if not k.startswith("signature.")}
    save_file(state, bare / "csreft_model.safetensors")
    meta = json.loads((src / "csreft_config.json").read_text())
    meta.pop("signature"), meta.pop("weights_sha256")
    (bare / "csreft_config.json").write_text(json.dumps(meta))
    adapters = f"{specialists / 'reverse' / 'adapter'},{bare}"
    with pytest.raises(SystemExit, match=r"bare has no signatures.*--calibration"):
        main(["compose", "--adapters", adapters, "--output-dir", str(tmp_path / "x"), "--routing", "signatures"])
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"prompt": f"capitalise: {w}", "skill": "upper"}) + "\n" for w in WORDS))
    main(["compose", "--adapters", adapters, "--output-dir", str(tmp_path / "lib"), "--routing", "signatures",
          "--calibration", str(calib)])
    model = _load(tiny_model_dir, tmp_path / "lib")
    b = _batch(tiny_model_dir, ["reverse", "upper"])
    assert model.route(b["input_ids"], b["attention_mask"], b["prompt_starts"]).argmax(1).tolist() == \
        [0] * len(WORDS) + [1] * len(WORDS)


def test_bad_signature_input_gets_one_clear_error(specialists, tiny_model_dir, tmp_path):
    adapters = ",".join(str(specialists / s / "adapter") for s in SKILLS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="empty.jsonl: contains no"):
        main(["compose", "--adapters", adapters, "--output-dir", str(tmp_path / "a"), "--routing", "signatures",
              "--calibration", str(empty)])
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"prompt": "x", "skill": "translate"}) + "\n")
    with pytest.raises(SystemExit, match=r"skill\(s\) \['translate'\], which the library does not have"):
        main(["compose", "--adapters", adapters, "--output-dir", str(tmp_path / "b"), "--routing", "signatures",
              "--calibration", str(unknown)])
    nameless = tmp_path / "nameless.jsonl"
    nameless.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(SystemExit, match="line 1: field 'skill' is missing"):
        main(["compose", "--adapters", adapters, "--output-dir", str(tmp_path / "c"), "--routing", "signatures",
              "--calibration", str(nameless)])
    # an adapter whose signature was read at another layer than the library's router
    deep = tmp_path / "deep"
    main(["train", "--data", str(_data(tmp_path / "d.jsonl", ["upper"])), "--model", str(tiny_model_dir),
          "--output-dir", str(deep), "--num-subspaces", "1", "--no-use-router", "--layers", "2,3", "--rank", "2",
          "--positions", "f3+l3", "--max-steps", "2", "--batch-size", "4"])
    with pytest.raises(SystemExit, match="read at layer 2, but the library's router reads layer 1"):
        main(["compose", "--adapters", f"{specialists / 'reverse' / 'adapter'},{deep / 'adapter'}",
              "--output-dir", str(tmp_path / "e"), "--routing", "signatures"])
    # a damaged signature in a saved file: refused before anything loads, naming the file
    lib = tmp_path / "lib"
    main(["compose", "--adapters", adapters, "--output-dir", str(lib), "--routing", "signatures"])
    state = load_file(lib / "csreft_model.safetensors")
    state["signature.mean"] = state["signature.mean"][:, :10].contiguous()
    save_file(state, lib / "csreft_model.safetensors")
    meta = json.loads((lib / "csreft_config.json").read_text())
    meta.pop("weights_sha256")
    (lib / "csreft_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"csreft_model.safetensors: signatures: signature.mean has shape \(3, 10\)"):
        _load(tiny_model_dir, lib)
    del state["signature.mean"]
    save_file(state, lib / "csreft_model.safetensors")
    with pytest.raises(ValueError, match="signature tensors \\['mean'\\] are missing"):
        _load(tiny_model_dir, lib)


def test_signature_routing_of_a_model_without_signatures_is_refused(tiny):
    model = get_csreft_model(tiny, CSReftConfig(layers=[1], rank=2, num_subspaces=2, routing="signatures"))
    randomize_edits(model, 0.5)
    with pytest.raises(ValueError, match="routing=signatures, but this model has no signatures"):
        model.route(torch.randint(3, 100, (2, 8)))
    with pytest.raises(ValueError, match="routing='signatures' is not valid: learned when use_router is false"):
        CSReftConfig(use_router=False, routing="signatures")


@pytest.mark.parametrize("n", [1, 2, 5])
def test_signatures_of_few_or_identical_prompts_are_finite_and_positive(n):
    x = torch.ones(n, 16) * 3.0  # identical summaries: no spread at all
    sig = fit(x)
    assert all(bool(torch.isfinite(v).all()) for v in sig.values())
    assert (sig["variances"] > 0).all() and sig["residual"] > 0
    scores = log_likelihood(stack([sig, fit(torch.randn(n, 16))]), torch.randn(4, 16) * 1e3)
    assert bool(torch.isfinite(scores).all())


def test_library_gates_are_valid_for_any_scores():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.floats(-1e30, 1e30), min_size=6, max_size=6), st.integers(1, 3),
           st.floats(1e-3, 1e3))
    def check(values, top_k, temperature):
        table = torch.tensor(values, dtype=torch.float32).reshape(2, 3)
        router = LibraryRouter("prototypes", temperature, top_k)
        router.scores = lambda *a: table  # the scores as given
        gates, probs = router(None, None, None, None)
        assert bool(torch.isfinite(gates).all()) and bool(torch.isfinite(probs).all())
        assert ((gates > 0).sum(1) <= top_k).all() and ((gates > 0).sum(1) >= 1).all()
        assert torch.allclose(gates.sum(1), torch.ones(2), atol=1e-5)

    check()


def test_a_self_routing_library_has_no_router_to_train(specialists, tiny_model_dir, tmp_path):
    lib = tmp_path / "lib"
    main(["compose", "--adapters", ",".join(str(specialists / s / "adapter") for s in SKILLS),
          "--output-dir", str(lib), "--routing", "signatures"])
    with pytest.raises(SystemExit, match="routes by signatures, which has nothing to train"):
        main(["train", "--init-adapter", str(lib), "--train", "router", "--data", str(_data(tmp_path / "d.jsonl", SKILLS)),
              "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"), "--max-steps", "2"])
    # the edits can still be trained under fixed signature routing; no router loss is added
    main(["train", "--init-adapter", str(lib), "--data", str(_data(tmp_path / "e.jsonl", SKILLS)),
          "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "edits"), "--max-steps", "2",
          "--batch-size", "4"])
    log = [json.loads(line) for line in (tmp_path / "edits" / "log.jsonl").read_text().splitlines()]
    assert all(not r.get("balance_loss") for r in log if "loss" in r)
