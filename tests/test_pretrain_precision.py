"""CPU bf16 pretraining (--cpu_precision): the network and heads run in bf16, every loss in float32.

For every method, one engine step under bf16 autocast: (1) no op inside the method's loss region
(``float32_loss``) makes a bf16 tensor, while the network did run in bf16 (a dispatch-mode hook);
(2) the loss values the engine logged equal the float32 loss of the same outputs cast to float32
(a replay: the second pass, without autocast, has every network/head output replaced by the
first pass's output ``.float()``). Then the resume rules and the refusal of unknown values.
Data: conftest's ``pretrain_tree`` (tiny Blobs, plainconvunet).
"""
import contextlib
import importlib
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nnssl.cli.pretrain import main as pretrain_main
from nnssl.errors import NnsslError
from nnssl.ssl.base import METHODS, float32_loss
from nnssl.training.pretrain_data import PretrainLoader
from nnssl.training.pretrain_setup import prepare, prepare_method
from nnssl.training.pretrainer import Pretrainer, pretrain

DS = "Dataset001_Blobs"
LOW = (torch.bfloat16, torch.float16)


def test_float32_loss_region_by_hand():
    x = torch.tensor([[1 + 2 ** -10]])  # bf16 keeps 8 mantissa bits: rounds this to 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = x @ x.t()
        with float32_loss(x):
            in_region = x @ x.t()
    assert in_autocast.dtype == torch.bfloat16 and in_autocast.item() == 1.0
    assert in_region.dtype == torch.float32 and in_region.item() == (1 + 2 ** -10) ** 2


class _DtypeLog(TorchDispatchMode):
    """Records the dtype of every floating tensor an op returns, and whether it was in a loss region."""

    def __init__(self):
        super().__init__()
        self.in_loss, self.low_in_loss, self.low_outside, self.loss_ops = False, [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if torch.is_tensor(t) and t.dtype in LOW:
                if self.in_loss:
                    self.low_in_loss.append(str(func))
                else:
                    self.low_outside += 1
        self.loss_ops += self.in_loss
        return out


def _boundary_modules(trainer):
    """The modules whose outputs enter the loss: the network, its encoder/decoder, every head of the method
    (its children; the members of a ModuleList/ModuleDict child)."""
    net, heads = trainer.network, []
    for m in trainer.method.children():
        heads += list(m.children()) if isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)) else [m]
    return [net, net.encoder, net.decoder] + heads


def _map(obj, fn):
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    return fn(obj) if torch.is_tensor(obj) else obj


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_engine_bf16_step_computes_every_loss_in_float32(pretrain_env, tmp_path, monkeypatch, method):
    bs = max(2, METHODS.get(method).min_batch_size)
    setup = prepare_method(prepare(DS, method, "plainconvunet", batch_size=bs), seed=0)
    trainer = Pretrainer(setup, str(tmp_path / "o"), 10, 10, torch.device("cpu"), 0, 0, False,
                         cpu_precision="bf16")
    batch = PretrainLoader(setup.data_folder, bs, setup.crop_size, setup.method_cls, setup.cfg, seed=0).make(0)
    log = _DtypeLog()
    module = importlib.import_module(type(trainer.method).__module__)

    @contextlib.contextmanager
    def marked_region(like):
        with float32_loss(like):
            log.in_loss = True
            try:
                yield
            finally:
                log.in_loss = False

    monkeypatch.setattr(module, "float32_loss", marked_region)
    recorded = {}
    handles = [m.register_forward_hook(lambda mod, i, o: recorded.setdefault(mod, []).append(
        _map(o, lambda t: t.detach().float())))
        for m in _boundary_modules(trainer)]
    with log:
        values = trainer._step(0, batch)  # the engine's path: bf16 autocast, backward, optimizer step
    for h in handles:
        h.remove()
    assert trainer.precision == "bf16" and log.low_outside > 0  # the network ran in bf16 ...
    assert log.loss_ops > 0 and log.low_in_loss == []  # ... and nothing in the loss region did

    calls = {m: iter(v) for m, v in recorded.items()}
    handles = [m.register_forward_hook(lambda mod, i, o: next(calls[mod])) for m in recorded]
    with torch.no_grad():  # float32, no autocast; every boundary output replaced by the bf16 pass's, cast
        replay = trainer.method.forward_loss(trainer.network, batch)
    for h in handles:
        h.remove()
    assert set(values) == {k for k, v in replay.items() if v.numel() == 1}
    for k, v in values.items():
        assert replay[k].dtype == torch.float32 and v == pytest.approx(replay[k].item(), rel=1e-6, abs=1e-7), k


def _run(tmp_path, **kw):
    args = dict(dataset=DS, method="volume_fusion", iterations=1, iterations_per_epoch=1, batch_size=2,
                device="cpu", num_workers=0, output_folder=str(tmp_path / "run"))
    args.update(kw)
    return pretrain(**args)


def _config(out):
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_resume_keeps_the_saved_precision_and_refuses_another(pretrain_env, tmp_path):
    out = _run(tmp_path, cpu_precision="fp32")
    assert _config(out)["precision"] == "fp32"
    resume = torch.load(os.path.join(out, "checkpoint_latest.pth"), weights_only=True)["resume"]
    assert resume["precision"] == "fp32"
    with pytest.raises(NnsslError, match=r"trained in fp32, but this run would train in bf16.*--cpu_precision fp32"):
        _run(tmp_path, iterations=2, resume=True, cpu_precision="bf16")
    _run(tmp_path, iterations=2, resume=True)  # no --cpu_precision: the saved fp32 continues ("auto" might be bf16)
    assert _config(out)["precision"] == "fp32"
    assert torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=True)["iteration"] == 2
    bf16 = _run(tmp_path, cpu_precision="bf16", output_folder=str(tmp_path / "bf16"))
    assert _config(bf16)["precision"] == "bf16"
    assert "bf16 autocast" in open(os.path.join(bf16, "training_log.txt"), encoding="utf-8").read()


def test_unknown_precision_is_refused_before_anything_is_written(pretrain_env, tmp_path, capsys):
    with pytest.raises(NnsslError, match="--cpu_precision 'fp16' is not one of auto, fp32, bf16"):
        _run(tmp_path, cpu_precision="fp16")
    with pytest.raises(SystemExit) as e:
        pretrain_main(["-d", DS, "-m", "volume_fusion", "--cpu_precision", "fp16", "-o", str(tmp_path / "cli")])
    assert e.value.code == 2 and "--cpu_precision" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "cli")
