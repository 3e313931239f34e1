"""Fine-tuning trainer of SwinUNETR (HybridMIM paper §IV-C: "in both pre-training and finetuning ...
AdamW ... cosine ... initial learning rate 1e-4, decay 1e-5, warmup").

``nnsslTrainer_SwinUNETR``: that is exactly the recipe of
:class:`~nnssl.training.trainers.logonet.nnsslTrainer_LoGoNet` (AdamW, peak lr 1e-4, weight decay
1e-5, linear warm-up over 5 % of the epochs then cosine to 0, nnU-Net's Dice + CE 1:1, no deep
supervision), so this class only gives SwinUNETR's fine-tuning its own stable name (nnU-Net finds a
trainer again by the name stored in its result folder).

Assumption: the warm-up share (the paper gives 50 epochs for its pretraining and none for
fine-tuning) and AdamW's betas (torch's defaults) are the LoGoNet trainer's.
"""
from nnssl.training.trainers.base import register_trainer
from nnssl.training.trainers.logonet import nnsslTrainer_LoGoNet


@register_trainer
class nnsslTrainer_SwinUNETR(nnsslTrainer_LoGoNet):
    """SwinUNETR fine-tuning: AdamW lr 1e-4, warm-up + cosine, Dice + CE 1:1, no deep supervision."""
