"""``nnssl_show_pretext``: what the pretext task shows the network, as a PNG mosaic.

The batch comes from the very loader pretraining uses (batch ``iteration`` of ``seed``, rank 0),
so the picture is exactly what step ``iteration`` of ``nnssl_pretrain --seed S`` trains on.
"""
import os
from typing import Sequence

from nnssl.errors import NnsslError
from nnssl.training.pretrain_data import PretrainLoader
from nnssl.training.pretrain_setup import prepare, prepare_method
from nnssl.training.progress import save_pretext_mosaic


def show_pretext(dataset, method: str, output_file: str, architecture: str = "plainconvunet",
                 pretraining_data: str = "intask", configuration: str = "3d_fullres", overrides: Sequence[str] = (),
                 seed: int = 0, batch_size=None, iteration: int = 0) -> str:
    """Write the mosaic of batch ``iteration`` to ``output_file`` (.png); returns its path."""
    if not output_file.lower().endswith(".png"):
        raise NnsslError(f"-o {output_file}: the mosaic is a PNG; give a file name ending in .png.")
    s = prepare_method(prepare(dataset, method, architecture, pretraining_data, configuration, overrides, batch_size),
                       seed)
    loader = PretrainLoader(s.data_folder, s.batch_size, s.crop_size, s.method_cls, s.cfg, seed, identifiers=s.cases)
    images, meta, rng = loader.images(iteration)  # images: [B, C, D, H, W]
    panels = s.method_cls.preview_from_images(s.cfg, images, rng, meta=meta)
    path = os.path.abspath(output_file)
    save_pretext_mosaic(panels, path, spacing=s.cm.spacing,
                        title=f"{method} on {s.target} (data: {s.source}, {s.arch.name} plans, crop "
                              f"{list(s.crop_size)}, seed {seed}, batch {iteration}, sample 0)")
    return path
