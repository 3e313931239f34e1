"""benchmarks/gpu_check.py stays runnable without a GPU: ``--smoke`` runs the whole script (data,
plans, the pretrain -> inject -> fine-tune -> predict chain against stock nnUNetv2_predict, every
method's pretraining step, fine-tuning and nnU-Net's anchor) on the CPU at tiny sizes."""
import os
import re
import subprocess
import sys

from test_predict import stock_nnunet_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke(tmp_path):
    env = stock_nnunet_env(tmp_path)  # stock nnUNetv2_predict in the chain (stand-in torchvision only if needed)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONIOENCODING"] = "utf-8"  # the table has "×"; a C/POSIX locale would make stdout ASCII
    out = tmp_path / "table.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--smoke", "--out",
                        str(out)], env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = out.read_text(encoding="utf-8")
    assert "FAILED" not in table, table
    assert re.search(r"chain on cpu: .* EQUAL masks \(1 case\(s\), differing voxels \[0\]\)", table), table
    rows = [ln.split("|")[1:-1] for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    steps = [c[1].strip() for c in rows]
    methods = ("hybrid_mim", "masked_kmeans", "order_reconstruction", "swin_pretext", "volume_fusion")
    assert [s.split(" (")[0] for s in steps] == (["nnUNetTrainer fine-tune"] + [f"pretrain {m}" for m in methods]
                                                 + ["fine-tune"])
    for c in rows:
        it_s, ratio = float(c[4]), float(c[5])
        assert it_s > 0 and ratio > 0
    assert float(rows[0][5]) == 1.0  # the anchor against itself
    # the planner's estimate for the anchor: nnU-Net's reference maps 560e6 feature-map units to 8 GB at batch 2
    assert 0 < float(rows[0][7]) < 8
