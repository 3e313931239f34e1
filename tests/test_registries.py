"""Every registered architecture and SSL method is complete: what the pipeline looks up by name exists.

Registry-driven, so an architecture or method added later is checked the day it lands.
"""
import dataclasses

import pytest

from nnssl.architectures import ARCHITECTURES
from nnssl.errors import NnsslError
from nnssl.ssl import METHODS
from nnssl.ssl.base import SSLMethod
from nnssl.training.trainer_lookup import find_trainer_class


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_architecture_has_planner_trainer_and_tiny_preset(name):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    spec = ARCHITECTURES.get(name)
    assert issubclass(spec.planner_class(), ExperimentPlanner)
    assert issubclass(find_trainer_class(spec.trainer), nnUNetTrainer)
    assert "tiny" in spec.presets, "tests and the demo need a tiny preset"


def test_plans_names_are_unique():
    names = [spec.plans_name for _, spec in ARCHITECTURES.items()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", METHODS.names())
def test_method_config_and_interface(name):
    cls = METHODS.get(name)
    assert issubclass(cls, SSLMethod) and cls.name == name
    assert cls.transfer in ("encoder", "encoder+decoder")
    cfg = cls.config_class()  # paper defaults need no arguments
    assert dataclasses.is_dataclass(cfg)
    assert cls.network_output_channels(cfg) >= 1


def test_unknown_names_list_the_choices():
    with pytest.raises(NnsslError, match="plainconvunet"):
        ARCHITECTURES.get("unet_typo")
    with pytest.raises(NnsslError, match="volume_fusion"):
        METHODS.get("mae_typo")
