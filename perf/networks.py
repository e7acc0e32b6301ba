"""Instance-norm networks for the training-step benchmark (``python -m perf.training``).

Each network comes as a *task*: an ``nn.Module`` whose ``forward(*batch)`` returns the training
loss, so ``torch.compile(task)`` compiles the whole model with its loss, and the step is
``loss = task(*batch); loss.backward(); optimizer.step()``. Widths and depths follow the papers;
``width`` scales every channel count so the smoke run can build tiny versions of the same graphs.

* ``TransformerNet``: Johnson et al.'s fast style transfer network (reflection-padded convs,
  InstanceNorm2d(affine=True), five residual blocks, nearest-upsample convs). The loss is a pixel
  MSE against a target image: the VGG perceptual loss of the original training is left out so
  that the step times the network that holds the instance norms.
* ``ResnetGenerator``: CycleGAN's ResNet-9 generator (InstanceNorm2d(affine=False), reflection
  padding, transposed-conv upsampling, tanh); L1 loss against a target, as its cycle loss.
* ``UNet3D``: an nnU-Net-style plain-conv 3D U-Net: two (Conv3d -> InstanceNorm3d(affine=True)
  -> LeakyReLU(0.01)) blocks per stage, strided-conv downsampling, transposed-conv upsampling,
  skip connections by concatenation, 1x1x1 segmentation head, cross-entropy.
* ``AdaINStyleTransfer``: Huang & Belongie's AdaIN training step with a small VGG-like encoder
  (random weights, frozen as in the paper), AdaIN, and a trained mirror decoder; content loss
  against the AdaIN target plus the mean/std style loss over four encoder levels. As in the
  paper, the AdaIN output is the decoder's input and the content target, computed from frozen
  features: its forward is on the step's path, its backward is not.

``to_triton(task)`` makes the triton_instnorm version of a task: ``convert_instance_norm`` swaps
every torch InstanceNorm layer, and every ``AdaINLayer`` switches from the eager torch AdaIN to
``triton_instnorm.adain``. ``NETWORKS`` names each benchmarked network with its full and smoke
sizes (smoke: a few channels, images that keep every instance-norm plane above one element),
its batch and the precision it is timed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from perf.model import EPS
from perf.schema import OURS


def conv_in_act(cin, cout, kernel, stride=1, *, dims=2, affine=True, act=None, reflect=True):
    """Conv -> InstanceNorm -> activation, the block all four networks repeat."""
    conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
    norm = (nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 2]
    pad = kernel // 2
    layers = [nn.ReflectionPad2d(pad), conv(cin, cout, kernel, stride)] if reflect else \
        [conv(cin, cout, kernel, stride, padding=pad)]
    layers.append(norm(cout, affine=affine, eps=EPS))
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def residual_block(channels, affine):
    return Residual(nn.Sequential(conv_in_act(channels, channels, 3, affine=affine, act=nn.ReLU()),
                                  conv_in_act(channels, channels, 3, affine=affine)))


class ImageToImage(nn.Module):
    """Task: a generator and a pixel loss against a target image."""

    def __init__(self, net: nn.Module, loss):
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, image, target):
        return self.loss(self.net(image), target)


# --------------------------------------------------------------------------- fast style transfer

def transformer_net(width=32):
    w = width
    up = [nn.Upsample(scale_factor=2, mode="nearest")]
    return nn.Sequential(
        conv_in_act(3, w, 9, act=nn.ReLU()),
        conv_in_act(w, 2 * w, 3, 2, act=nn.ReLU()),
        conv_in_act(2 * w, 4 * w, 3, 2, act=nn.ReLU()),
        *[residual_block(4 * w, affine=True) for _ in range(5)],
        *up, conv_in_act(4 * w, 2 * w, 3, act=nn.ReLU()),
        *up, conv_in_act(2 * w, w, 3, act=nn.ReLU()),
        nn.ReflectionPad2d(4), nn.Conv2d(w, 3, 9),
    )


def style_transfer_task(width=32):
    return ImageToImage(transformer_net(width), F.mse_loss)


# --------------------------------------------------------------------------- CycleGAN generator

def resnet_generator(ngf=64, n_blocks=9):
    relu = nn.ReLU(True)

    def up(cin, cout):
        return [nn.ConvTranspose2d(cin, cout, 3, 2, padding=1, output_padding=1),
                nn.InstanceNorm2d(cout, affine=False, eps=EPS), relu]

    return nn.Sequential(
        conv_in_act(3, ngf, 7, affine=False, act=relu),
        conv_in_act(ngf, 2 * ngf, 3, 2, affine=False, act=relu, reflect=False),
        conv_in_act(2 * ngf, 4 * ngf, 3, 2, affine=False, act=relu, reflect=False),
        *[residual_block(4 * ngf, affine=False) for _ in range(n_blocks)],
        *up(4 * ngf, 2 * ngf), *up(2 * ngf, ngf),
        nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh(),
    )


def cyclegan_task(width=64):
    return ImageToImage(resnet_generator(width), F.l1_loss)


# --------------------------------------------------------------------------- nnU-Net 3D U-Net

def unet_stage(cin, cout, stride):
    act = nn.LeakyReLU(0.01, inplace=True)
    return nn.Sequential(conv_in_act(cin, cout, 3, stride, dims=3, act=act, reflect=False),
                         conv_in_act(cout, cout, 3, dims=3, act=act, reflect=False))


class UNet3D(nn.Module):
    """Plain-conv U-Net; ``features[i]`` channels at stage i, stride 2 between stages."""

    def __init__(self, features=(32, 64, 128, 256, 320, 320), in_channels=1, num_classes=3):
        super().__init__()
        strides = [1] + [2] * (len(features) - 1)
        cins = [in_channels, *features[:-1]]
        self.encoder = nn.ModuleList(unet_stage(i, o, s)
                                     for i, o, s in zip(cins, features, strides))
        self.up = nn.ModuleList(nn.ConvTranspose3d(features[i + 1], features[i], 2, 2)
                                for i in range(len(features) - 1))
        self.decoder = nn.ModuleList(unet_stage(2 * f, f, 1) for f in features[:-1])
        self.head = nn.Conv3d(features[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)


class Segmentation(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, volume, labels):
        return F.cross_entropy(self.net(volume), labels)


def unet3d_task(features=(32, 64, 128, 256, 320, 320)):
    return Segmentation(UNet3D(features))


# --------------------------------------------------------------------------- AdaIN

def eager_adain(content, style, eps=EPS):
    """AdaIN with torch ops; sigma = sqrt(biased var + eps), the estimator instance norm uses."""
    dims = tuple(range(2, content.dim()))
    c_var, c_mean = torch.var_mean(content, dims, correction=0, keepdim=True)
    s_var, s_mean = torch.var_mean(style, dims, correction=0, keepdim=True)
    return (content - c_mean) / torch.sqrt(c_var + eps) * torch.sqrt(s_var + eps) + s_mean


class AdaINLayer(nn.Module):
    fn = staticmethod(eager_adain)  # to_triton sets triton_instnorm.adain

    def forward(self, content, style):
        return self.fn(content, style, eps=EPS)


def _conv_relu(cin, cout):
    return [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3), nn.ReLU()]


def vgg_like_encoder(w=64):
    """relu1_1, relu2_1, relu3_1, relu4_1 levels of a VGG-19-shaped encoder (random weights)."""
    pool = [nn.MaxPool2d(2, 2, ceil_mode=True)]
    return nn.ModuleList([
        nn.Sequential(nn.Conv2d(3, 3, 1), *_conv_relu(3, w)),
        nn.Sequential(*_conv_relu(w, w), *pool, *_conv_relu(w, 2 * w)),
        nn.Sequential(*_conv_relu(2 * w, 2 * w), *pool, *_conv_relu(2 * w, 4 * w)),
        nn.Sequential(*_conv_relu(4 * w, 4 * w), *_conv_relu(4 * w, 4 * w),
                      *_conv_relu(4 * w, 4 * w),
                      *pool, *_conv_relu(4 * w, 8 * w)),
    ])


def mirror_decoder(w=64):
    up = [nn.Upsample(scale_factor=2, mode="nearest")]
    return nn.Sequential(
        *_conv_relu(8 * w, 4 * w), *up,
        *_conv_relu(4 * w, 4 * w), *_conv_relu(4 * w, 4 * w), *_conv_relu(4 * w, 4 * w),
        *_conv_relu(4 * w, 2 * w), *up,
        *_conv_relu(2 * w, 2 * w), *_conv_relu(2 * w, w), *up,
        *_conv_relu(w, w), nn.ReflectionPad2d(1), nn.Conv2d(w, 3, 3),
    )


def _mean_std(features):
    var, mean = torch.var_mean(features, (2, 3), correction=0)
    return mean, torch.sqrt(var + EPS)


class AdaINStyleTransfer(nn.Module):
    def __init__(self, width=64, style_weight=10.0):
        super().__init__()
        self.encoder = vgg_like_encoder(width).requires_grad_(False)
        self.adain = AdaINLayer()
        self.decoder = mirror_decoder(width)
        self.style_weight = style_weight

    def levels(self, image):
        out = []
        for level in self.encoder:
            image = level(image)
            out.append(image)
        return out

    def forward(self, content, style):
        style_levels = self.levels(style)
        target = self.adain(self.levels(content)[-1], style_levels[-1])
        generated_levels = self.levels(self.decoder(target))
        loss = F.mse_loss(generated_levels[-1], target)
        for g, s in zip(generated_levels, style_levels):
            (g_mean, g_std), (s_mean, s_std) = _mean_std(g), _mean_std(s)
            style = F.mse_loss(g_mean, s_mean) + F.mse_loss(g_std, s_std)
            loss = loss + self.style_weight * style
        return loss


# --------------------------------------------------------------------------- conversion

def to_triton(task: nn.Module) -> nn.Module:
    """The triton_instnorm version of a task, in place (see the module docstring)."""
    import triton_instnorm  # after the command decided on Triton's interpreter

    triton_instnorm.convert_instance_norm(task)
    for module in task.modules():
        if isinstance(module, AdaINLayer):
            module.fn = triton_instnorm.adain
    return task


# --------------------------------------------------------------------------- benchmarked networks

@dataclass(frozen=True)
class Network:
    name: str
    task: str                 # the builder above
    kwargs: dict              # its arguments at full size ...
    smoke_kwargs: dict        # ... and in the smoke run
    batch: int
    smoke_batch: int
    image: tuple              # (C, *spatial) of one input sample
    smoke_image: tuple
    inputs: str = "image_pair"   # image_pair: (image, target) / (content, style); segmentation
    dtype: str = "float32"       # or "bfloat16 autocast"
    memory_format: str = "contiguous"

    def sizes(self, smoke: bool):
        """(builder kwargs, input shape)."""
        if smoke:
            return self.smoke_kwargs, (self.smoke_batch, *self.smoke_image)
        return self.kwargs, (self.batch, *self.image)


_UNET = dict(task="unet3d_task", kwargs=dict(features=(32, 64, 128, 256, 320, 320)),
             smoke_kwargs=dict(features=(4, 8, 16, 16)), batch=2, smoke_batch=2,
             image=(1, 128, 128, 128), smoke_image=(1, 16, 16, 16), inputs="segmentation",
             dtype="bfloat16 autocast")
_CYCLEGAN = dict(task="cyclegan_task", kwargs=dict(width=64), smoke_kwargs=dict(width=4),
                 image=(3, 256, 256), smoke_image=(3, 16, 16))
NETWORKS = {n.name: n for n in (
    Network("style_transfer", "style_transfer_task", dict(width=32), dict(width=4), 4, 2,
            (3, 256, 256), (3, 16, 16)),
    Network("cyclegan_b1", batch=1, smoke_batch=1, **_CYCLEGAN),
    Network("cyclegan_b4", batch=4, smoke_batch=2, **_CYCLEGAN),
    Network("unet3d", **_UNET),
    Network("unet3d_channels_last", memory_format="channels_last_3d", **_UNET),
    Network("adain", "AdaINStyleTransfer", dict(width=64), dict(width=4), 8, 2, (3, 256, 256),
            (3, 32, 32)),
)}


def make_task(net: Network, variant: str, device, smoke: bool) -> nn.Module:
    """The network's task, ``variant`` one of schema.VARIANTS, from seeded weights."""
    torch.manual_seed(0)  # the same weights in both variants
    task = globals()[net.task](**net.sizes(smoke)[0])
    if variant == OURS:
        to_triton(task)
    task = task.to(device)
    if net.memory_format == "channels_last_3d":
        task = task.to(memory_format=torch.channels_last_3d)
    return task


def make_batch(net: Network, device, smoke: bool):
    """(image, target) or (content, style) pairs, or (volume, labels) for segmentation."""
    shape = net.sizes(smoke)[1]
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(shape, generator=generator)
    if net.inputs == "segmentation":
        second = torch.randint(0, 3, (shape[0], *shape[2:]), generator=generator)
    else:
        second = torch.rand(shape, generator=generator) * 2 - 1
    if net.memory_format == "channels_last_3d":
        first = first.contiguous(memory_format=torch.channels_last_3d)
    return first.to(device), second.to(device)
