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


def test_every_numeric_method_field_is_range_checked():
    """NaN in any numeric field of any method is refused with the field's range and the list of ranges."""
    import dataclasses
    import math

    import nnssl.ssl  # noqa: F401
    from nnssl.errors import NnsslError
    from nnssl.ssl.base import METHODS, numeric_range

    assert numeric_range("lr")[3] == "> 0" and numeric_range("weight_decay")[3] == ">= 0"
    assert numeric_range("mask_ratio")[3] == "in [0, 1]" and numeric_range("mask_value")[3] == "any finite number"
    for name in METHODS.names():
        cls = METHODS.get(name).config_class
        default = cls()  # the paper's defaults lie in range
        checked = 0
        for f in dataclasses.fields(default):
            value = getattr(default, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            with pytest.raises(NnsslError, match=rf"^{name}: "):  # some by the method's own, earlier checks
                cls(**{f.name: math.nan})
            checked += 1
        assert checked >= 5, name
    with pytest.raises(NnsslError, match=r"volume_fusion: weight_decay=-1 is not valid: it must be >= 0 \(and finite\)"
                                         r".* Valid ranges of the numeric volume_fusion settings -- "
                                         r"> 0: K, .*lr.*; >= 0: .*weight_decay.*; in \[0, 1\]: flip_prob"):
        METHODS.get("volume_fusion").config_class(weight_decay=-1)
