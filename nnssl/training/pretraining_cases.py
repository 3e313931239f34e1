"""Which cases a pretraining saw, and whether a fine-tuning validates on any of them.

Every pretraining records its case identifiers: the sorted list in the run's ``config.json``
(``pretraining_cases``) and, in each checkpoint, its sha256 and count
(``pretraining_cases_sha256``, ``pretraining_cases_count``; a shared model carries no case
names). ``nnssl_train -pretrained`` compares that list with the validation cases of its fold
(nnU-Net's ``splits_final.json``) and warns, naming the overlap
(``nnssl_pretrained.json``: ``pretraining_cases_in_validation``).

``nnssl_pretrain -pd intask --fold K`` pretrains on fold K's training cases only, so fold K's
validation cases stay unseen; the split is nnU-Net's (``splits_final.json``, created as nnU-Net's
trainer would if it is missing: 5-fold ``KFold`` of the sorted identifiers, seed 12345).
"""
import hashlib
import json
import os
from typing import List, Optional, Sequence

from nnssl import paths
from nnssl.errors import NnsslError
from nnssl.io import write_json

CONFIG_FILE = "config.json"  # the pretraining run's metadata (written by the pretrainer)
NNUNET_SPLIT_SEED, NNUNET_N_SPLITS = 12345, 5  # nnUNetTrainer.do_split's defaults


def cases_sha256(cases: Sequence[str]) -> str:
    """sha256 of the sorted identifiers, one per line: ['b', 'a'] -> sha256(b"a\\nb")."""
    return hashlib.sha256("\n".join(sorted(cases)).encode("utf-8")).hexdigest()


def case_record(cases: Sequence[str]) -> dict:
    """What the checkpoint stores about its cases: their count and the sha256 of the sorted list."""
    return {"pretraining_cases_sha256": cases_sha256(cases), "pretraining_cases_count": len(cases)}


def load_splits(target: str, data_identifier: str) -> List[dict]:
    """The target's ``splits_final.json``; written first, as nnU-Net's trainer would, if it is missing."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    base = os.path.join(paths.preprocessed(), target)
    splits_file = os.path.join(base, "splits_final.json")
    if os.path.isfile(splits_file):
        with open(splits_file, encoding="utf-8") as f:
            return json.load(f)
    data = os.path.join(base, data_identifier)
    if not os.path.isdir(data):
        raise NnsslError(f"--fold needs nnU-Net's split of {target}'s training cases, but there is neither "
                         f"{splits_file} nor preprocessed training data ({data}) to make it from. Run "
                         f"`nnssl_plan_and_preprocess -d {target} -pd intask` first.")
    keys = sorted(infer_dataset_class(data).get_identifiers(data))
    if len(keys) < NNUNET_N_SPLITS:
        raise NnsslError(f"{target} has {len(keys)} training cases, too few for nnU-Net's 5-fold split (--fold). "
                         f"Pretrain without --fold, or write your own split to {splits_file}.")
    splits = generate_crossval_split(keys, seed=NNUNET_SPLIT_SEED, n_splits=NNUNET_N_SPLITS)
    write_json(splits, splits_file)
    print(f"nnssl: wrote nnU-Net's 5-fold split of {target} to {splits_file} (the one nnssl_train will use).")
    return splits


def fold_training_cases(target: str, data_identifier: str, fold: int, available: Sequence[str]) -> List[str]:
    """Fold ``fold``'s training cases (sorted) among the ``available`` pretraining cases."""
    splits = load_splits(target, data_identifier)
    if not 0 <= int(fold) < len(splits):
        raise NnsslError(f"--fold {fold}: splits_final.json of {target} has folds 0-{len(splits) - 1}. Pick one of "
                         f"them (the fold you will fine-tune).")
    train = set(splits[int(fold)]["train"])
    missing = sorted(train - set(available))
    if missing:
        raise NnsslError(f"--fold {fold}: {len(missing)} training case(s) of fold {fold} are not in the in-task "
                         f"pretraining data (e.g. {missing[0]}); rerun `nnssl_plan_and_preprocess -d {target} -pd "
                         f"intask` to preprocess them.")
    return sorted(train)


def recorded_cases(ckpt: dict, checkpoint_path: str) -> Optional[List[str]]:
    """The case list of the run that wrote the checkpoint (``config.json`` beside it), if it is there
    and matches the checkpoint's sha256; else None."""
    expected = ckpt.get("pretraining_cases_sha256")
    config = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), CONFIG_FILE)
    if expected is None or not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            cases = json.load(f).get("pretraining_cases")
    except (OSError, ValueError):
        return None
    return sorted(cases) if isinstance(cases, list) and cases_sha256(cases) == expected else None


def leakage_check(ckpt: dict, checkpoint_path: str, dataset: str, fold, validation_cases: Sequence[str]) -> dict:
    """``{"pretraining_cases_in_validation": [...] or None, "pretraining_cases_check": reason}``.

    The list names the validation cases of ``fold`` the checkpoint was pretrained on; None when
    that cannot be known (another dataset's images, no case list beside the checkpoint, fold 'all')."""
    source = ckpt["dataset"] if ckpt.get("pretraining_data") == "intask" else ckpt.get("pretraining_data")
    if str(fold) == "all":
        return {"pretraining_cases_in_validation": None,
                "pretraining_cases_check": "fold 'all' validates on its own training cases"}
    if source != dataset:
        return {"pretraining_cases_in_validation": None,
                "pretraining_cases_check": f"pretrained on {source}'s images, not {dataset}'s: case names are not "
                                           f"comparable"}
    if ckpt.get("pretraining_cases_sha256") is None:
        return {"pretraining_cases_in_validation": None,
                "pretraining_cases_check": "the checkpoint records no pretraining cases (written by an older nnssl)"}
    cases = recorded_cases(ckpt, checkpoint_path)
    if cases is None:
        n = ckpt.get("pretraining_cases_count")
        return {"pretraining_cases_in_validation": None,
                "pretraining_cases_check": f"the checkpoint's case list ({n} cases; {CONFIG_FILE} of its "
                                           f"pretraining run) is not beside it, so the overlap is unknown"}
    overlap = sorted(set(cases) & set(validation_cases))
    return {"pretraining_cases_in_validation": overlap,
            "pretraining_cases_check": f"{len(cases)} pretraining cases compared with the {len(validation_cases)} "
                                       f"validation cases of fold {fold}"}


def leakage_warning(overlap: Sequence[str], n_validation: int, dataset: str, fold, method: str) -> str:
    """The console/log warning for a non-empty overlap (names at most 20 cases)."""
    shown = ", ".join(overlap[:20]) + (f", ... ({len(overlap) - 20} more)" if len(overlap) > 20 else "")
    return (f"nnssl: WARNING pretraining/validation leakage: {len(overlap)} of the {n_validation} validation cases "
            f"of fold {fold} were pretraining images of this checkpoint: {shown}. Their validation scores are not "
            f"independent of pretraining. Pretrain per fold instead: nnssl_pretrain -d {dataset} -m {method} "
            f"-pd intask --fold {fold}.")
