"""Command-line parsing shared by every nnssl command: no abbreviations, no misspelt option read as
a short option with a glued value, nnU-Net's flag names as aliases."""
import importlib
import pkgutil

import pytest

import nnssl.cli
from nnssl.cli._common import NnsslArgumentParser
from nnssl.cli.predict import build_parser as predict_parser
from nnssl.cli.train import build_parser as train_parser, main as train_main

POSITIONALS = ["1", "3d_fullres", "0"]


def cli_modules():
    return [m.name for m in pkgutil.iter_modules(nnssl.cli.__path__) if not m.name.startswith("_")]


@pytest.mark.parametrize("name", cli_modules())
def test_every_command_uses_the_strict_parser(name):
    parser = importlib.import_module(f"nnssl.cli.{name}").build_parser()
    assert isinstance(parser, NnsslArgumentParser)
    assert parser.allow_abbrev is False


@pytest.mark.parametrize("argv", [["-pretrained_weights=ck.pth"], ["-pretrained_weights", "ck.pth"],
                                  ["-pretrained=ck.pth"], ["-pretrained", "ck.pth"]])
def test_pretrained_weights_is_an_alias_of_pretrained(argv):
    a = train_parser().parse_args(POSITIONALS + argv)
    assert a.pretrained == "ck.pth"
    assert a.plans is None  # plain argparse reads "-pretrained_weights=ck.pth" as -p "retrained_weights=ck.pth"


@pytest.mark.parametrize("arg, suggestion", [("-pretrained_weight=ck.pth", "-pretrained_weights"),
                                             ("-pretrain", "-pretrained"), ("-pnnUNetPlans", None)])
def test_misspelt_options_are_refused_not_glued_to_a_short_option(arg, suggestion, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(POSITIONALS + [arg, "ck.pth"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized option {arg.split('=')[0]}" in err and "'-p VALUE'" in err
    if suggestion:
        assert f"did you mean {suggestion}?" in err


def test_no_abbreviations_but_spaced_and_numeric_short_values_work(capsys):
    with pytest.raises(SystemExit) as e:
        train_parser().parse_args(POSITIONALS + ["--epoch", "3"])  # abbreviation of --epochs
    assert e.value.code == 2 and "--epoch" in capsys.readouterr().err
    assert train_parser().parse_args(POSITIONALS + ["-p", "nnUNetPlans"]).plans == "nnUNetPlans"
    a = predict_parser().parse_args(["-i", "in", "-o", "out", "-d", "1", "-c", "3d_fullres", "-f0"])
    assert a.folds == ["0"]
