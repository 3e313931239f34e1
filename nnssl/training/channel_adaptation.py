"""Pretrained weights for a task with more input channels than the pretraining had.

A 1-channel CT model fine-tuned on a 2-channel task, or a 1-channel MRI model on BraTS' 4
channels: every weight that reads the network input (the stem convolutions; recognised as the
checkpoint tensors ``[O, C_p, *k]`` whose counterpart in the fine-tuning network is
``[O, C, *k]``) is repeated ``r = C / C_p`` times along its input-channel axis and divided by
``r``. The adapted network then computes on an input whose pretrained channels are each
repeated ``r`` times exactly what the pretrained network computes on the original input, and
every channel starts with an equal share of the pretrained filter (OpenMind's choice). Fewer
channels than the pretraining (``C < C_p``) or a ``C`` that is not a multiple of ``C_p`` is
refused: it would drop or split pretrained inputs.
"""
from typing import Dict, List, Tuple

import torch

from nnssl.errors import NnsslError


def check_channels_adaptable(checkpoint_channels: int, target_channels: int, what: str) -> None:
    """Refuse a target whose channel count cannot be reached from the checkpoint's by repetition."""
    if target_channels < checkpoint_channels or target_channels % checkpoint_channels:
        raise NnsslError(
            f"{what} has {target_channels} input channel(s) but the checkpoint was pretrained with "
            f"{checkpoint_channels}. nnssl adapts a checkpoint to more channels by repeating its stem weights "
            f"(the target's channel count must be a multiple of the checkpoint's); fewer channels would drop "
            f"pretrained inputs. Use a checkpoint pretrained with {target_channels} channel(s) or fewer that "
            f"divide it.")


def adapt_input_channels(weights: Dict[str, torch.Tensor], network_state: Dict[str, torch.Tensor],
                         checkpoint_channels: int, target_channels: int) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(weights with the stem tensors adapted, names of the adapted tensors); unchanged when C == C_p."""
    if target_channels == checkpoint_channels:
        return weights, []
    check_channels_adaptable(checkpoint_channels, target_channels, "The fine-tuning network")
    r = target_channels // checkpoint_channels
    adapted, names = dict(weights), []
    for key, w in weights.items():
        target = network_state.get(key)
        if (target is None or w.ndim < 2 or w.shape[1] != checkpoint_channels or target.shape[1] != target_channels
                or target.shape[:1] + target.shape[2:] != w.shape[:1] + w.shape[2:]):
            continue
        repeats = [1] * w.ndim
        repeats[1] = r
        adapted[key] = w.repeat(*repeats) / r
        names.append(key)
    return adapted, names
