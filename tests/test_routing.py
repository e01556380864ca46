"""Routing mechanisms and routing quality: NMI, the balance term, router inputs, shared
subspaces, a router reading a deeper layer, annealed gates."""

import json

import pytest
import torch

from conftest import randomize_edits, tiny_llama
from csreft import CSReftConfig, Router, get_csreft_model
from csreft.router import balance_loss
from csreft.router import routing_nmi


def test_nmi_is_one_for_separated_skills_and_zero_for_shared_gates():
    skills = ["a", "b", "c"] * 10
    own = torch.eye(3)[[0, 1, 2] * 10] * 0.9 + 0.05
    assert routing_nmi(own, skills)["nmi"] == pytest.approx(1.0)
    assert routing_nmi(own[:, [2, 0, 1]], skills)["nmi"] == pytest.approx(1.0)  # any relabelling
    same = torch.tensor([0.2, 0.7, 0.4]).repeat(30, 1)
    assert routing_nmi(same, skills) == {"nmi": 0.0, "soft_nmi": 0.0, "n": 30}
    # soft NMI sees the gates' spread: sharp gates score higher than blurred ones
    blurred = torch.eye(3)[[0, 1, 2] * 10] * 0.2 + 0.4
    assert routing_nmi(blurred, skills)["nmi"] == pytest.approx(1.0)
    assert 0 < routing_nmi(blurred, skills)["soft_nmi"] < routing_nmi(own, skills)["soft_nmi"] < 1
    # two skills sharing one subspace: less than 1; unlabelled rows (-1) are skipped
    merged = torch.eye(3)[[0, 0, 2] * 10]
    assert 0.3 < routing_nmi(merged, skills)["nmi"] < 0.9
    assert routing_nmi(torch.cat([own, own[:5]]), skills + [-1] * 5)["n"] == 30


def test_balance_loss_rewards_confident_balanced_assignments():
    k = 4
    balanced = torch.eye(k).repeat(3, 1) * 0.98 + 0.005
    collapsed = torch.tensor([[0.98, 0.005, 0.005, 0.005]]).repeat(12, 1)
    uniform = torch.full((12, k), 0.5)
    assert balance_loss(balanced).item() == pytest.approx(-1.0, abs=0.1)
    assert balance_loss(collapsed).item() == pytest.approx(0.0, abs=0.1)
    assert balance_loss(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert balance_loss(torch.rand(1, 1)).item() == 0.0


def test_balance_term_alone_separates_clustered_inputs():
    results = []
    for seed in range(4):
        torch.manual_seed(seed)
        router = Router(16, 8, 3)
        clusters = torch.arange(60) % 3
        x = torch.randn(3, 16)[clusters] * 2 + 0.3 * torch.randn(60, 16)
        before = routing_nmi(router(x)[1], clusters.tolist())["nmi"]
        opt = torch.optim.Adam(router.parameters(), lr=1e-2)
        for _ in range(150):
            loss = balance_loss(router(x)[1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append((before, routing_nmi(router(x)[1], clusters.tolist())["nmi"]))
    # a clustering objective has local optima (two clusters on one subspace: NMI 0.73 for seed 0)
    assert all(after > before + 0.3 for before, after in results), results
    assert sum(after > 0.99 for _, after in results) >= 3, results


def test_router_inputs_read_the_right_tokens():
    torch.manual_seed(0)
    hidden = torch.randn(2, 10, 16)
    starts, ends = torch.tensor([1, 3]), torch.tensor([9, 7])
    summaries = {}
    for mode in ("mean", "first", "last", "head", "attention"):
        router = Router(16, 8, 3, router_input=mode, head=3)
        summaries[mode] = router.summarise(hidden, starts, ends)
    torch.testing.assert_close(summaries["mean"][0], hidden[0, 1:9].mean(0))
    torch.testing.assert_close(summaries["first"][1], hidden[1, 3])
    torch.testing.assert_close(summaries["last"][1], hidden[1, 6])
    torch.testing.assert_close(summaries["head"][1], hidden[1, 3:6].mean(0))
    torch.testing.assert_close(summaries["attention"], summaries["mean"])  # zero query: uniform weights
    router = Router(16, 8, 3, router_input="attention")
    with torch.no_grad():
        router.query.copy_(hidden[0, 4] * 50)  # a query that picks out one token
    picked = router.summarise(hidden, starts, ends)[0]
    assert (picked - hidden[0, 4]).abs().max() < 0.05
    summary = router.summarise(hidden, starts, ends)
    router(summary)[0].sum().backward()
    assert router.query.grad is not None and router.query.grad.abs().sum() > 0


def test_annealed_gates_go_from_soft_to_hard():
    torch.manual_seed(0)
    router = Router(16, 8, 4, gating="anneal")
    x = torch.randn(6, 16) * 3
    router.progress = 0.0
    gates, probs = router(x)
    torch.testing.assert_close(gates, probs)
    router.progress = 1.0
    gates, probs = router(x)
    torch.testing.assert_close(gates, (probs >= 0.5).float())
    router.progress = 0.5
    gates.sum().backward()  # straight-through: the router still learns at any progress
    assert all(p.grad is not None for p in router.parameters())
    assert "progress" not in router.state_dict()  # not saved: a loaded router is hard


def _capture_input(base, layer, ids, mask=None):
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    handle = base.model.layers[layer].register_forward_pre_hook(keep, with_kwargs=True)
    base(input_ids=ids, attention_mask=mask)
    handle.remove()
    return seen["h"]


def test_shared_subspaces_stay_on_when_every_routed_gate_is_off():
    cfg = CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, shared_subspaces=1, positions="f3+l3")
    model = get_csreft_model(tiny_llama(), cfg)
    randomize_edits(model, scale=0.5)
    assert model.edits["1"][0].weight.shape[0] == 2 * 4
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        model.router.mlp[-1].bias.fill_(-1e4)  # every routed gate 0
        out = model(ids)
        base = model.base_model(input_ids=ids).logits
        assert out.gates.shape == (2, 3) and out.gates.abs().max() < 1e-6
        assert (out.logits - base).abs().max() > 1e-3  # the shared edit still acts
        for group in model.edits.values():  # without it: exactly the base
            for edit in group:
                edit.weight[6:] = edit.stacked_basis().T[6:]
                edit.bias[6:] = 0
        torch.testing.assert_close(model(ids).logits, base)


def test_router_reading_a_deeper_layer_sees_the_unedited_states_and_learns():
    cfg = CSReftConfig(layers=[1, 3], rank=2, num_subspaces=3, positions="f3+l3", router_layer=2,
                       router_input="last", router_hidden=16)
    model = get_csreft_model(tiny_llama(), cfg)
    randomize_edits(model, scale=0.5)
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    hidden = _capture_input(model.base_model, 2, ids, mask)  # no edits: plain forward of the base
    starts, ends = torch.tensor([0, 3]), torch.tensor([12, 12])  # absolute, in the padded rows
    expected = model.router(model.router.summarise(hidden, starts, ends))[0]
    labels = ids.masked_fill(torch.arange(12) < 9, -100)  # the prompt ends at the first label
    out = model(ids, attention_mask=mask, labels=labels, prompt_lengths=[12, 9])
    torch.testing.assert_close(out.gates, expected)
    torch.testing.assert_close(model.route(ids, mask, prompt_lengths=[12, 9]), expected.detach())
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.router.parameters())
    assert not any(p.grad is not None for p in model.base_model.parameters())
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 15)


def test_router_reading_an_earlier_layer_needs_no_first_pass():
    cfg = CSReftConfig(layers=[2, 3], rank=2, num_subspaces=3, positions="f3+l3", router_layer=0, router_hidden=16)
    model = get_csreft_model(tiny_llama(), cfg)
    ids = torch.randint(3, 128, (2, 12))
    calls = []
    model.base_model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    hidden = _capture_input(model.base_model, 0, ids)
    calls.clear()
    out = model(ids)
    assert len(calls) == 1
    expected = model.router(model.router.summarise(hidden, torch.tensor([0, 0]), torch.tensor([12, 12])))[0]
    torch.testing.assert_close(out.gates, expected)


def test_configs_saved_before_the_routing_options_still_load(tmp_path):
    # as saved before: the router read the mean of the prompt, no balance term
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, router_input="mean",
                                                        balance_weight=0.0))
    randomize_edits(model)
    model.save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "csreft_config.json").read_text())
    for name in ("shared_subspaces", "router_head", "router_layer", "balance_weight"):
        del meta["csreft_config"][name]
    (tmp_path / "a" / "csreft_config.json").write_text(json.dumps(meta))
    loaded = type(model).from_pretrained(tiny_llama(), tmp_path / "a")
    ids = torch.randint(3, 128, (2, 12))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    # the options it lacks take the meaning they had when it was trained, not today's defaults
    assert loaded.csreft_config.balance_weight == 0.0 and loaded.csreft_config.shared_subspaces == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"balance_weight": -1.0}, "balance_weight=-1.0"),
    ({"balance_weight": float("nan")}, "balance_weight=nan .*finite"),
    ({"shared_subspaces": -1}, "shared_subspaces=-1 .*>= 0"),
    ({"router_layer": -2}, "router_layer=-2"),
    ({"router_input": "middle"}, "router_input='middle' .*attention"),
    ({"gating": "soft-ish"}, "gating='soft-ish' .*anneal"),
    ({"router_head": 0}, "router_head=0"),
])
def test_bad_routing_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CSReftConfig(**kwargs)
    with pytest.raises(ValueError, match="router_layer=9 .*4 layers"):
        get_csreft_model(tiny_llama(), CSReftConfig(layers=[1], router_layer=9, rank=2, num_subspaces=2))


def test_unsupervised_training_logs_routing_and_the_balance_term_separates_requests(tmp_path, tiny_model_dir):
    """Skills that share their inputs and differ only in the request (first word): with the
    head of the prompt as router input and the balance term, the gates follow the request."""
    from test_train import options

    from csreft.data import pad_batch
    from csreft.training.recipe import build, fit

    run = build(options(tmp_path, tiny_model_dir, max_steps=40, lr=2e-2, router_hidden=32, router_input="head",
                        router_head=2, balance_weight=1.0, gating="anneal"))
    fit(run)
    assert run.model.router.progress == 1.0  # annealed gates end hard
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    logged = [r for r in log if "loss" in r]
    assert {"routing_nmi", "routing_soft_nmi", "balance_loss"} <= set(logged[0])
    assert logged[-1]["balance_loss"] < logged[0]["balance_loss"]
    batch = pad_batch(run.train_set.examples, run.tokenizer.pad_token_id)
    gates = run.model.route(batch["input_ids"], batch["attention_mask"], batch["prompt_starts"], batch["prompt_lengths"])
    skills = [e["skill_label"] for e in run.train_set.examples]
    assert routing_nmi(gates, skills)["nmi"] > 0.7
    # the same run without the balance term and with the mean of the prompt: one shared gate vector
    plain = build(options(tmp_path / "plain", tiny_model_dir, max_steps=40, lr=2e-2, router_hidden=32,
                          router_input="mean", balance_weight=0.0, gating="soft"))
    fit(plain)
    gates = plain.model.route(batch["input_ids"], batch["attention_mask"], batch["prompt_starts"], batch["prompt_lengths"])
    assert routing_nmi(gates, skills)["nmi"] < 0.3


def test_kmeans_start_gives_each_cluster_its_own_subspace_before_any_training():
    from csreft.router import cluster_init, kmeans, routing_nmi

    torch.manual_seed(3)
    centres = torch.randn(3, 32) * 4
    labels = torch.arange(3).repeat_interleave(40)
    x = centres[labels] + torch.randn(120, 32)
    assign = kmeans(x, 3)
    assert routing_nmi(torch.nn.functional.one_hot(assign, 3).float(), labels.tolist())["nmi"] > 0.99
    assert torch.equal(assign, kmeans(x, 3))  # seeded
    router = Router(32, 16, 3)
    before = routing_nmi(router(x)[1].detach(), labels.tolist())["nmi"]
    cluster_init(router, x, dims=4)
    after = router(x)[1].detach()
    assert routing_nmi(after, labels.tolist())["nmi"] > 0.99 and before < 0.9
    assert (after.max(1).values > 0.9).all()  # committed gates, one subspace per cluster


def test_router_init_kmeans_in_a_training_run(tmp_path, tiny_model_dir):
    import json

    from csreft.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{p} {w}", "response": w, "skill": p}) + "\n"
                            for p in ("reverse it:", "double it:") for w in ["abc", "dog", "cat", "sun"]))
    main(["train", "--data", str(data), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run"),
          "--num-subspaces", "2", "--layers", "1,2", "--rank", "2", "--positions", "f3+l3", "--max-steps", "2",
          "--batch-size", "4", "--router-input", "mean", "--router-init", "kmeans"])
    saved = json.loads((tmp_path / "run" / "adapter" / "csreft_config.json").read_text())
    assert saved["csreft_config"]["router_init"] == "kmeans"
    with pytest.raises(ValueError, match="router_init='bad' is not valid: one of random, kmeans"):
        CSReftConfig(router_init="bad")


def test_router_init_kmeans_fixed_keeps_the_clustered_router_through_training(tmp_path, tiny_model_dir):
    import json

    from safetensors.torch import load_file

    from csreft.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{p} {w}", "response": w, "skill": p}) + "\n"
                            for p in ("reverse it:", "double it:") for w in ["abc", "dog", "cat", "sun"]))
    common = ["--data", str(data), "--model", str(tiny_model_dir), "--num-subspaces", "2", "--layers", "1,2",
              "--rank", "2", "--positions", "f3+l3", "--batch-size", "4", "--router-input", "mean",
              "--router-init", "kmeans-fixed", "--lr", "1e-2"]
    main(["train", *common, "--output-dir", str(tmp_path / "a"), "--max-steps", "1"])
    main(["train", *common, "--output-dir", str(tmp_path / "b"), "--max-steps", "4"])
    a, b = (load_file(tmp_path / r / "adapter" / "csreft_model.safetensors") for r in "ab")
    router = [k for k in a if k.startswith("router.")]
    assert router and all(torch.equal(a[k], b[k]) for k in router)  # set before step 1, never moved
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("edits."))
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["router_parameters"] == 0 and summary["edit_parameters"] > 0


def test_init_adapter_keeps_its_trained_router_unless_router_init_is_given(tmp_path, tiny_model_dir, monkeypatch):
    """An adapter saved with router_init=kmeans, trained further with --init-adapter, keeps the
    router it has: the k-means start runs only for a fresh router or when --router-init asks."""
    import json

    import csreft.training.recipe as recipe
    from csreft.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{p} {w}", "response": w, "skill": p}) + "\n"
                            for p in ("reverse it:", "double it:") for w in ["abc", "dog", "cat", "sun"]))
    common = ["--data", str(data), "--model", str(tiny_model_dir), "--batch-size", "4", "--max-steps", "1"]
    main(["train", *common, "--output-dir", str(tmp_path / "a"), "--num-subspaces", "2", "--layers", "1,2",
          "--rank", "2", "--positions", "f3+l3", "--router-input", "mean", "--router-init", "kmeans"])
    started = []
    real = recipe.start_router
    monkeypatch.setattr(recipe, "start_router", lambda *a, **k: started.append(1) or real(*a, **k))
    main(["train", *common, "--output-dir", str(tmp_path / "b"), "--init-adapter", str(tmp_path / "a" / "adapter")])
    assert started == []
    main(["train", *common, "--output-dir", str(tmp_path / "c"), "--init-adapter", str(tmp_path / "a" / "adapter"),
          "--router-init", "kmeans"])
    assert started == [1]
