"""The standard knowledge-distillation benchmark models for 32x32 colour images (CIFAR-100).

Each follows the definition in RepDistiller (Tian et al., "Contrastive Representation
Distillation", ICLR 2020; github.com/HobbitLong/RepDistiller, models/), which mdistiller and
most KD papers reuse, so parameter counts match the published tables exactly (tests/test_zoo.py
checks them against counts taken from the official code). Differences, none of which changes a
parameter: any number of input channels; global average pooling written as adaptive pooling, so
other image sizes work; forward returns logits only (features are tapped by module path).
With the official models' weights copied in state-dict order, ours compute the same logits
(checked for all ten against RepDistiller at commit b84f547, to within float rounding).
"""

from kdistill.models.cifar import mobilenetv2, resnet, shufflenetv2, vgg, wrn  # noqa: F401  (registers them)
