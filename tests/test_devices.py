"""-device mps: used where torch has MPS, otherwise refused (exit 2) with the reason."""
import pytest
import torch

from nnssl.devices import DEVICES, resolve_device
from nnssl.errors import NnsslError


def test_mps_is_a_device_choice_of_every_command_with_device():
    from nnssl.cli import predict, pretrain, train

    for module in (train, predict, pretrain):
        action = next(a for a in module.build_parser()._actions if "-device" in a.option_strings)
        assert tuple(action.choices) == DEVICES == ("cpu", "cuda", "mps")


def test_mps_refusals_say_why(monkeypatch):
    mps = torch.backends.mps
    monkeypatch.setattr(mps, "is_built", lambda: False)
    with pytest.raises(NnsslError, match=r"this torch build \(.*\) has no MPS support.*macOS"):
        resolve_device("mps")
    monkeypatch.setattr(mps, "is_built", lambda: True)
    monkeypatch.setattr(mps, "is_available", lambda: False)
    with pytest.raises(NnsslError, match="sees no MPS device.*macOS 12.3"):
        resolve_device("mps")
    monkeypatch.setattr(mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("mps", local_rank=0) == torch.device("mps")  # what a plain nnssl_pretrain passes
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun
    with pytest.raises(NnsslError, match="torch.distributed has no MPS backend"):
        resolve_device("mps", local_rank=1)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="the refusal needs a torch without a usable MPS device")
@pytest.mark.parametrize("command", ["train", "predict", "pretrain"])
def test_cli_refuses_mps_with_exit_2(command, capsys, tmp_path, monkeypatch):
    import importlib

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path))
    argv = {"train": ["1", "3d_fullres", "0", "-device", "mps"],
            "predict": ["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-d", "1", "-c", "3d_fullres", "-f", "0",
                        "-device", "mps"],
            "pretrain": ["-d", "1", "-m", "volume_fusion", "-device", "mps"]}[command]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"nnssl.cli.{command}").main(argv)
    assert e.value.code == 2
    assert "-device mps:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
