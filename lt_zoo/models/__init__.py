"""lt_zoo architectures; importing this package registers them with timm."""
from .cifar_resnet import CIFAR_DEPTHS, CifarResNet
from .imagenet_resnet import IMAGENET_DEPTHS, LtResNet
