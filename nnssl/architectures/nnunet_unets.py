"""nnU-Net's own networks: the default ``PlainConvUNet`` and the residual-encoder U-Net (M and L presets).

Both are planned by nnU-Net's planners unchanged (through thin nnssl subclasses that only
add size presets), so ``plainconvunet`` writes the very ``nnUNetPlans.json`` that
``nnUNetv2_plan_and_preprocess`` writes and stock nnU-Net commands work on it.
"""
from nnssl.architectures.spec import DEFAULT_CAPABILITIES, ArchitectureSpec, register_architecture

# Tiny widths for tests and the demo on 2 CPU cores (~1 M parameters at a 32^3 patch).
_TINY_UNET = {"UNet_base_num_features": 8, "UNet_max_features_3d": 64}

register_architecture(ArchitectureSpec(
    name="plainconvunet",
    planner="nnssl.planning.planners.nnsslPlainConvUNetPlanner",
    plans_name="nnUNetPlans",
    trainer="nnsslTrainer",
    description="nnU-Net's default PlainConvUNet (nnUNetPlans)",
    presets={"tiny": _TINY_UNET},
    # dynamic_network_architectures' UNetDecoder is transposed conv + concat + convs at every level,
    # so it runs unchanged on consistently centre-cropped skips (HybridMIM's partial decoding).
    capabilities=DEFAULT_CAPABILITIES | {"cropped_decoder"},
))

register_architecture(ArchitectureSpec(
    name="resenc",
    planner="nnssl.planning.planners.nnsslResEncUNetMPlanner",
    plans_name="nnUNetResEncUNetMPlans",
    trainer="nnsslTrainer",
    description="nnU-Net's residual-encoder U-Net, M preset (nnUNetResEncUNetMPlans)",
    presets={"tiny": _TINY_UNET},
    # dynamic_network_architectures' UNetDecoder is transposed conv + concat + convs at every level,
    # so it runs unchanged on consistently centre-cropped skips (HybridMIM's partial decoding).
    capabilities=DEFAULT_CAPABILITIES | {"cropped_decoder"},
))

register_architecture(ArchitectureSpec(
    name="resenc_l",
    planner="nnssl.planning.planners.nnsslResEncUNetLPlanner",
    plans_name="nnUNetResEncUNetLPlans",
    trainer="nnsslTrainer",
    description="nnU-Net's residual-encoder U-Net, L preset (nnUNetResEncUNetLPlans; OpenMind's ResEnc-L family)",
    presets={"tiny": _TINY_UNET},
    capabilities=DEFAULT_CAPABILITIES | {"cropped_decoder"},  # the same decoder as resenc
))
