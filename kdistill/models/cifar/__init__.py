"""The standard knowledge-distillation benchmark models for 32x32 colour images (CIFAR-100).

Each follows the definition in RepDistiller (Tian et al., "Contrastive Representation
Distillation", ICLR 2020; github.com/HobbitLong/RepDistiller, models/), which mdistiller and
most KD papers reuse, so parameter counts match the published tables exactly (tests/test_zoo.py
checks them against counts taken from the official code). Differences, none of which changes a
parameter: any number of input channels; global average pooling written as adaptive pooling, so
other image sizes work; forward returns logits only (features are tapped by module path).
State-dict keys and shapes are the official ones, and with the official models' weights ours
compute the same logits (checked for all ten against RepDistiller at commit b84f547, to within
float rounding). So RepDistiller's and mdistiller's published teachers load once converted from
pickle, which kdistill never reads, to safetensors:

    state = torch.load("ckpt_epoch_240.pth", map_location="cpu", weights_only=True)["model"]
    safetensors.torch.save_file(state, "wrn_40_2.safetensors")  # then teacher.checkpoint=wrn_40_2.safetensors
"""

from kdistill.models.cifar import mobilenetv2, resnet, shufflenetv2, vgg, wrn  # noqa: F401  (registers them)
