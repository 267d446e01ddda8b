"""Model families and initialisations.

``build_model(name, input_shape, num_classes, **options)`` builds any registered model:

==================  =====================================================================
``mlp``             flatten, ``depth`` hidden layers of ``width`` units (default 1 x 2048 ReLU)
``linear-mlp``      the same without activations (deep linear network)
``cnn``             the small MNIST CNN, sized from the input
``wide-resnet``     WRN-depth-k with ``batchnorm`` / ``skip`` switches
``resnet``          a small CIFAR-style ResNet preset (same switches)
``transformer``     a one-block self-attention classifier for ``(B, T)`` token ids
==================  =====================================================================

>>> from graddyn.models import build_model, last_linear
>>> model = build_model("mlp", (1, 8, 8), 10, width=32, depth=3, init="orthogonal")
>>> last_linear(model)[0]
'7'
"""

from graddyn.models import _cnn, _mlp, _resnet, _transformer  # noqa: F401  (fill MODELS)
from graddyn.models._build import MODELS, build_model, model_options
from graddyn.models._cnn import SmallCNN
from graddyn.models._init import INIT_SCHEMES, init_weights
from graddyn.models._mlp import ACTIVATIONS, MLP
from graddyn.models._resnet import ResidualBlock, ResNet
from graddyn.models._transformer import SelfAttention, TransformerClassifier
from graddyn.models._utils import count_parameters, evaluate, last_linear

__all__ = [
    "ACTIVATIONS",
    "INIT_SCHEMES",
    "MLP",
    "MODELS",
    "ResNet",
    "ResidualBlock",
    "SelfAttention",
    "SmallCNN",
    "TransformerClassifier",
    "build_model",
    "count_parameters",
    "evaluate",
    "init_weights",
    "last_linear",
    "model_options",
]
