"""setup.py declares what the code imports: every third-party module imported by nnssl (and its
planning / dataset_conversion packages) belongs to a distribution in install_requires, or to an
optional extra for modules imported only where that option is used."""
import ast
import importlib.metadata
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = {"wandb": "tracking", "tensorboard": "tracking"}  # imported only when the tracker is switched on


def setup_kwargs() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: k.value for k in call.keywords}


def requirement_names(node) -> set:
    return {re.split(r"[<>=!~;\[ ]", ast.literal_eval(e))[0].lower().replace("_", "-") for e in node.elts}


def imported_top_level_modules() -> set:
    found = set()
    for base in ("nnssl", "planning", "dataset_conversion"):
        for folder, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith(".py"):
                    tree = ast.parse(open(os.path.join(folder, f), encoding="utf-8").read())
                    for n in ast.walk(tree):
                        if isinstance(n, ast.Import):
                            found |= {a.name.split(".")[0] for a in n.names}
                        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                            found.add(n.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"nnssl", "planning", "dataset_conversion"}


def test_every_imported_package_is_declared():
    kwargs = setup_kwargs()
    required = requirement_names(kwargs["install_requires"])
    extras = {ast.literal_eval(k): requirement_names(v) for k, v in zip(kwargs["extras_require"].keys,
                                                                        kwargs["extras_require"].values)}
    dist_of = importlib.metadata.packages_distributions()
    modules = imported_top_level_modules()
    assert {"torch", "nnunetv2", "batchgenerators", "acvl_utils", "scipy", "nibabel", "SimpleITK"} <= modules
    for module in sorted(modules):
        dists = {d.lower().replace("_", "-") for d in dist_of.get(module, [module])}
        if module in OPTIONAL:
            assert dists & extras[OPTIONAL[module]] and dists & extras["dev"], module
        else:
            assert dists & required, f"'{module}' is imported but none of {dists} is in install_requires"


def test_license_and_metadata():
    kwargs = setup_kwargs()
    text = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert ast.literal_eval(kwargs["license"]) == "Apache-2.0"
    assert "License :: OSI Approved :: Apache Software License" in ast.literal_eval(kwargs["classifiers"])
    nnunet = [ast.literal_eval(e) for e in kwargs["install_requires"].elts if ast.literal_eval(e).startswith("nnunetv2")]
    assert nnunet and "<" in nnunet[0]  # capped: nnssl uses nnU-Net's internals
