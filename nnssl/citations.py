"""What to cite for a pretrained model: the paper of each SSL method nnssl implements (the papers
in SPEC.md's table) and of each foreign pretrained format nnssl reads. Model cards carry them."""

METHOD_CITATIONS = {
    "volume_fusion": "Guotai Wang, Jianghao Wu, Xiangde Luo, Xinglong Liu, Kang Li, Shaoting Zhang. MIS-FM: 3D Medical "
                     "Image Segmentation using Foundation Models Pretrained on a Large-Scale Unannotated Dataset. "
                     "2023. https://github.com/openmedlab/MIS-FM",
    "masked_kmeans": "Amin Karimi Monsefi, Payam Karisani, Mengxi Zhou, Stacey Choi, Nathan Doble, Heng Ji, Srinivasan "
                     "Parthasarathy, Rajiv Ramnath. Masked LoGoNet: Fast and Accurate 3D Image Analysis for Medical "
                     "Domain. 2024.",
    "swin_pretext": "Andreas Hammer Haaversen, Durga Prasad Bavirisetti, Gabriel Hanssen Kiss, Frank Lindseth. QT-UNet: A "
                    "Self-Supervised Self-Querying All-Transformer U-Net for 3D Segmentation. IEEE Access, 2024. "
                    "doi:10.1109/ACCESS.2024.3395058",
    "hybrid_mim": "Zhaohu Xing, Lei Zhu, Lequan Yu, Zhiheng Xing, Liang Wan. HybridMIM: A Hybrid Masked Image Modeling "
                  "Framework for 3D Medical Image Segmentation. https://github.com/ge-xing/HybridMIM",
    "order_reconstruction": "Shahina Kunhimon, Abdelrahman Shaker, Muzammal Naseer, Salman Khan, Fahad Shahbaz Khan. "
                            "Learnable Weight Initialization for Volumetric Medical Image Segmentation. 2023. "
                            "https://github.com/ShahinaKK/LWI-VMS",
}

# The papers behind the foreign pretrained files nnssl reads (nnssl.checkpoints.formats).
SOURCE_CITATIONS = {
    "openmind": "Tassilo Wald, Constantin Ulrich, Jonathan Suprijadi, Sebastian Ziegler, Michal Nohel, Robin Peretzke, "
                "Gregor Koehler, Klaus H. Maier-Hein. An OpenMind for 3D medical vision self-supervised learning. "
                "ICCV 2025. arXiv:2412.17041. https://github.com/MIC-DKFZ/nnssl",
    "swin_ssl": "Yucheng Tang, Dong Yang, Wenqi Li, Holger R. Roth, Bennett Landman, Daguang Xu, Vishwesh Nath, Ali "
                "Hatamizadeh. Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis. CVPR "
                "2022.",
    "mis_fm": METHOD_CITATIONS["volume_fusion"],
}


def method_citation(method: str) -> str:
    """The citation of an SSL method (``nnssl_pretrain -m`` name) or a foreign format's paper."""
    return METHOD_CITATIONS.get(method) or SOURCE_CITATIONS.get(method) or f"unknown method {method!r}: no citation"
