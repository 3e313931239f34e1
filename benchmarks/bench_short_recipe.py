"""How ``nnsslTrainer_Short``'s recipe was chosen: scratch fine-tuning with recipe variants, test Dice per organ.

The demo's data (``nnssl.demo.prepare_data``: 6 labeled synthetic cases, 3 test cases; the
shape and number of cases can be changed to fit the time) is written once under --out; each
variant (fields of :class:`nnssl.training.trainers.short.ShortRecipe`, e.g. ``lr=1e-2``) trains
fold ``all`` from scratch for --epochs x --iterations_per_epoch with the global RNGs seeded,
predicts the test images and evaluates them. One row per variant: foreground mean Dice over
the 13 organs, the four large organs, wall time and the 1-minute load average at the end.

Run: ``python benchmarks/bench_short_recipe.py --out /tmp/recipes --variant lr=3e-3 --variant lr=1e-2``
"""
import argparse
import contextlib
import dataclasses
import io
import json
import os
import time

ORGANS = ("liver", "stomach", "aorta", "inferior_vena_cava")


def parse_variant(text: str) -> dict:
    from nnssl.training.trainers.short import ShortRecipe

    types = {f.name: f.type for f in dataclasses.fields(ShortRecipe)}
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=")
        out[k] = v if types[k] in (str, "str") else float(v)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", required=True, help="e.g. lr=3e-3,decay=cosine ('' = defaults)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--iterations_per_epoch", type=int, default=20)
    p.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64])
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import torch
    from nnssl import demo
    from nnssl.benchmark.runs import organ_dice, seed_everything
    from nnssl.training.trainers import short

    torch.set_num_threads(int(os.environ.get("NNSSL_BENCH_THREADS", "1")))
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    s = dataclasses.replace(demo.FULL, name="recipes", shape=tuple(a.shape), cases=a.cases, finetune_epochs=a.epochs,
                            iterations_per_epoch=a.iterations_per_epoch)
    out = os.path.abspath(a.out)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tree, labels_ts = demo.prepare_data(s, os.path.join(out, "data"))
    with open(os.path.join(tree["nnUNet_raw"], "Dataset001_BTCV", "dataset.json"), encoding="utf-8") as f:
        dataset_json = json.load(f)
    print(f"shape {tuple(a.shape)}, {a.cases} cases, {a.epochs} x {a.iterations_per_epoch} iterations, seed {a.seed}")
    print("| variant | test mean Dice | " + " | ".join(ORGANS) + " | wall | load |\n|---|---|" + "---|" * len(ORGANS)
          + "---|---|", flush=True)
    for text in a.variant:
        short.nnsslTrainer_Short.recipe = dataclasses.replace(short.RECIPE, **parse_variant(text))
        run_root = os.path.join(out, "runs", text.replace(",", "_").replace("=", "-") or "default")
        t0 = time.time()
        seed_everything(a.seed)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            pred = demo.finetune_and_test(s, tree, labels_ts, run_root, None)
        with open(os.path.join(pred, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        per = organ_dice(summary, dataset_json)
        print(f"| {text or 'default'} | {summary['foreground_mean']['Dice']:.3f} | "
              + " | ".join(f"{per[o]:.2f}" for o in ORGANS) + f" | {time.time() - t0:.0f} s | "
              f"{os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
