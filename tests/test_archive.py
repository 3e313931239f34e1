"""The model archive (nnssl/checkpoints/archive.py, publish.py): every member hashed in the model
card, an edited card / plans / checkpoint refused (exit 2 through a command), the card's software
versions, license and citation."""
import hashlib
import json
import os
import zipfile

import pytest
import torch

from conftest import write_raw_dataset
from foreign_finetune import native_checkpoint
from nnssl.errors import NnsslError


@pytest.fixture
def exported(nnunet_env, tmp_path):
    from nnssl.checkpoints import export_pretrained

    ckpt = {**native_checkpoint(), "pretraining_cases_count": 7}
    path = str(tmp_path / "checkpoint_final.pth")
    torch.save(ckpt, path)
    plans_dir = os.path.join(nnunet_env["nnUNet_preprocessed"], ckpt["dataset"])
    os.makedirs(plans_dir)
    with open(os.path.join(plans_dir, "nnUNetPlans.json"), "w", encoding="utf-8") as f:
        json.dump({"plans_name": "nnUNetPlans", "configurations": {}}, f)
    archive = str(tmp_path / "model.zip")
    card = export_pretrained(path, archive, license="CC-BY-4.0")
    return {"ckpt": ckpt, "archive": archive, "card": card, "env": nnunet_env}


def rewrite(src, dst, **changes):
    """Copy the zip ``src`` to ``dst`` with members replaced (bytes), added, or removed (None)."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members.update(changes)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            if data is not None:
                z.writestr(name, data)
    return str(dst)


def test_card_lists_every_members_sha256_versions_license_and_citation(exported):
    from importlib import metadata

    import nnssl
    from nnssl.checkpoints import load_pretraining_checkpoint

    with zipfile.ZipFile(exported["archive"]) as z:
        members = {n: z.read(n) for n in z.namelist()}
    card = json.loads(members["model_card.json"])
    assert sorted(card["members"]) == ["checkpoint_final.json", "checkpoint_final.pth", "plans.json"]
    for name, digest in card["members"].items():
        assert digest == hashlib.sha256(members[name]).hexdigest(), name
    body = {k: v for k, v in card.items() if k != "card_sha256"}
    assert card["card_sha256"] == hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert card["software"] == {"nnssl": nnssl.__version__, "nnunetv2": metadata.version("nnunetv2"),
                                "torch": torch.__version__}
    assert card["license"] == "CC-BY-4.0"
    assert card["citation"].startswith("Guotai Wang") and "MIS-FM" in card["citation"]
    assert json.loads(members["plans.json"]) == {"plans_name": "nnUNetPlans", "configurations": {}}
    assert card["num_volumes"] == 7 and json.loads(members["checkpoint_final.json"])["pretraining_cases_count"] == 7
    loaded = load_pretraining_checkpoint(exported["archive"])
    for k, v in exported["ckpt"]["network_weights"].items():
        assert torch.equal(v, loaded["network_weights"][k]), k


@pytest.mark.parametrize("edit, message", [
    ("card", "model_card.json was edited"),
    ("plans", "sha256 of plans.json"),
    ("metadata", "sha256 of checkpoint_final.json"),
    ("checkpoint", "sha256 of checkpoint_final.pth"),
    ("extra", "evil.py is not listed"),
    ("missing", "plans.json, listed in model_card.json, is missing"),
    ("legacy", "lists no sha256 per member"),
])
def test_an_edited_member_is_refused(exported, tmp_path, edit, message):
    from nnssl.checkpoints import load_pretraining_checkpoint

    with zipfile.ZipFile(exported["archive"]) as z:
        card, plans = json.loads(z.read("model_card.json")), json.loads(z.read("plans.json"))
        pth = bytearray(z.read("checkpoint_final.pth"))
    pth[len(pth) // 2] ^= 0xFF
    legacy = {k: v for k, v in card.items() if k not in ("members", "card_sha256")}
    changes = {
        "card": {"model_card.json": json.dumps({**card, "spacing": [2.0, 2.0, 2.0]}).encode()},
        "plans": {"plans.json": json.dumps({**plans, "plans_name": "other"}).encode()},
        "metadata": {"checkpoint_final.json": b"{}"},
        "checkpoint": {"checkpoint_final.pth": bytes(pth)},
        "extra": {"evil.py": b"print(1)"},
        "missing": {"plans.json": None},
        "legacy": {"model_card.json": json.dumps(legacy).encode()},
    }[edit]
    path = rewrite(exported["archive"], tmp_path / "edited.zip", **changes)
    with pytest.raises(NnsslError, match=message):
        load_pretraining_checkpoint(path)


def test_a_command_given_an_edited_archive_exits_2(exported, tmp_path, capsys):
    from nnssl.cli.plan_and_preprocess import main

    write_raw_dataset(exported["env"]["nnUNet_raw"], n_train=2, n_test=0, shape=(16, 16, 16))
    with zipfile.ZipFile(exported["archive"]) as z:
        card = json.loads(z.read("model_card.json"))
    edited = rewrite(exported["archive"], tmp_path / "edited.zip",
                     **{"model_card.json": json.dumps({**card, "license": "MIT"}).encode()})
    with pytest.raises(SystemExit) as e:
        main(["-d", "Blobs", "--like", edited, "-np", "1", "--no_pbar"])
    assert e.value.code == 2
    assert "model_card.json was edited" in capsys.readouterr().err


def test_export_refuses_an_output_that_is_not_a_zip(exported, tmp_path):
    from nnssl.checkpoints.archive import write_archive

    with pytest.raises(NnsslError, match="must end in .zip"):
        write_archive(str(tmp_path / "model.tar"), exported["ckpt"], "{}", {})
    assert not os.path.exists(tmp_path / "model.tar")
