"""Run in a subprocess by test_hub.py, with HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE set in
its environment (huggingface_hub reads them at import). Prints one JSON line."""

import json
import sys
from pathlib import Path

import torch

from conftest import randomize_edits, tiny_llama
from csreft import CSReftConfig, CSReftModel, get_csreft_model

mode, work = sys.argv[1], Path(sys.argv[2])
result = {}
if mode == "push":  # push a trained-looking adapter, then load it back from the endpoint
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3"))
    randomize_edits(model, scale=0.5)
    meta = {"skills": ["a", "b", "c"], "skill_routing": True, "step": 7, "training": {"data": "train.jsonl", "command": "csreft train ..."}}
    model.save_pretrained(work / "local", metadata=meta)
    loaded_local = CSReftModel.from_pretrained(tiny_llama(), work / "local")
    result["commit"] = loaded_local.push_to_hub("org/adapter", token="test-token")
    hub = CSReftModel.from_pretrained(tiny_llama(), "org/adapter")
    ids = torch.randint(3, 128, (2, 9))
    result["logits_equal"] = torch.equal(hub(ids).logits, model.eval()(ids).logits)
    result["skills"] = hub.skill_names
    result["bit_identical"] = all(torch.equal(v, loaded_local.adapter_state_dict()[k])
                                  for k, v in hub.adapter_state_dict().items())
elif mode == "load":  # load `argv[3]` at revision `argv[4]` (may be "-")
    revision = None if sys.argv[4] == "-" else sys.argv[4]
    try:
        model = CSReftModel.from_pretrained(tiny_llama(), sys.argv[3], revision=revision)
        result["weights"] = {k: v.tolist() for k, v in model.adapter_state_dict().items() if k.endswith("bias")}
    except Exception as err:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(err).__name__}: {err}"
elif mode == "cli-push":  # csreft push DIR REPO, the base model's shape read from its local folder
    from csreft.cli import main

    main(["push", str(work / "local"), "org/cli", "--model", sys.argv[3]])
    result["ok"] = True
elif mode == "push-fails":
    model = CSReftModel.from_pretrained(tiny_llama(), work / "local")
    try:
        model.push_to_hub("org/adapter", token="test-token")
    except Exception as err:  # noqa: BLE001
        result["error"] = f"{type(err).__name__}: {err}"
print(json.dumps(result))
