"""Drop-in ``nn`` modules. Each subclasses the torch module it replaces, so ``state_dict``,
``repr`` and ``extra_repr`` match, and ``forward`` is one call into the functional."""
from mmkernels.nn.bilinear import Bilinear, HyperLinear, Quadratic
from mmkernels.nn.gating import GatedFusion
from mmkernels.nn.losses import CrossEntropyLoss, LinearCrossEntropyLoss
from mmkernels.nn.moe import DenseMoE, MoE, MoEOutput
from mmkernels.nn.product import PiSigma, ProductUnit, SigmaPi
from mmkernels.nn.softmax import LogSoftmax, Softmax, Softmin
from mmkernels.nn.switches import AttentionModule, HardSwitch, SoftSwitch

__all__ = ["Bilinear", "Quadratic", "HyperLinear", "Softmax", "LogSoftmax", "Softmin", "MoE", "MoEOutput",
           "CrossEntropyLoss", "LinearCrossEntropyLoss", "AttentionModule", "SoftSwitch", "HardSwitch",
           "GatedFusion", "DenseMoE",
           "ProductUnit", "SigmaPi", "PiSigma"]
