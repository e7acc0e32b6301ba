"""Small models with the structure of public reference networks, written for the fusion tests
(not copied from them): nnU-Net's PlainConvUNet and ResidualEncoderUNet (dynamic_network_
architectures, whose block classes carry that package's module path, as fusion identifies
them), fast-neural-style's TransformerNet (pytorch/examples), CycleGAN's ResnetGenerator and
PatchGAN discriminator, StarGAN v2's generator output and MUNIT's residual blocks; and
``eager_ops_after_norms``, which counts what still runs eagerly after a norm."""

import functools

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

_DNA = "dynamic_network_architectures.building_blocks."


# --- nnU-Net (dynamic_network_architectures) ------------------------------------------------------

class ConvDropoutNormReLU(nn.Module):
    """conv, norm, nonlin, each an attribute and, in order, an ``all_modules`` Sequential."""

    def __init__(self, cin, cout, stride=1, kernel=3, nonlin=True):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
        self.norm = nn.InstanceNorm3d(cout, eps=1e-5, affine=True)
        layers = [self.conv, self.norm]
        if nonlin:
            self.nonlin = nn.LeakyReLU(0.01, inplace=True)
            layers.append(self.nonlin)
        self.all_modules = nn.Sequential(*layers)

    def forward(self, x):
        return self.all_modules(x)


class StackedConvBlocks(nn.Module):
    def __init__(self, n, cin, cout, stride=1):
        super().__init__()
        self.convs = nn.Sequential(ConvDropoutNormReLU(cin, cout, stride),
                                   *(ConvDropoutNormReLU(cout, cout) for _ in range(n - 1)))

    def forward(self, x):
        return self.convs(x)


class BasicBlockD(nn.Module):
    """conv1 (norm and nonlin), conv2 (norm only), the skip (identity or a projection), then
    ``out += residual`` and nonlin2; the stochastic-depth and squeeze-excitation flags."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = ConvDropoutNormReLU(cin, cout, stride)
        self.conv2 = ConvDropoutNormReLU(cout, cout, nonlin=False)
        self.nonlin2 = nn.LeakyReLU(0.01, inplace=True)
        self.apply_stochastic_depth = self.apply_se = False
        if cin != cout or stride != 1:
            self.skip = nn.Sequential(nn.AvgPool3d(stride, stride),
                                      ConvDropoutNormReLU(cin, cout, kernel=1, nonlin=False))
        else:
            self.skip = lambda x: x

    def forward(self, x):
        residual = self.skip(x)
        out = self.conv2(self.conv1(x))
        if self.apply_stochastic_depth:
            out = self.drop_path(out)
        if self.apply_se:
            out = self.squeeze_excitation(out)
        out += residual
        return self.nonlin2(out)


class StackedResidualBlocks(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.blocks = nn.Sequential(BasicBlockD(cin, cout, stride),
                                    *(BasicBlockD(cout, cout) for _ in range(n - 1)))

    def forward(self, x):
        return self.blocks(x)


for _cls, _module in ((ConvDropoutNormReLU, "simple_conv_blocks"),
                      (StackedConvBlocks, "simple_conv_blocks"), (BasicBlockD, "residual"),
                      (StackedResidualBlocks, "residual")):
    _cls.__module__ = _DNA + _module


class _Encoder(nn.Module):
    """Stages in a Sequential, run one by one for the skips."""

    def __init__(self, stages, stem=None):
        super().__init__()
        self.stem, self.stages = stem, nn.Sequential(*stages)

    def forward(self, x):
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class _Decoder(nn.Module):
    def __init__(self, widths, convs):
        super().__init__()
        pairs = list(zip(widths[:0:-1], widths[-2::-1]))
        self.transpconvs = nn.ModuleList(nn.ConvTranspose3d(a, b, 2, 2) for a, b in pairs)
        self.stages = nn.ModuleList(StackedConvBlocks(convs, 2 * b, b) for _, b in pairs)
        self.seg = nn.Conv3d(widths[0], 2, 1)

    def forward(self, skips):
        x = skips[-1]
        for up, stage, skip in zip(self.transpconvs, self.stages, skips[-2::-1]):
            x = stage(torch.cat((up(x), skip), 1))
        return self.seg(x)


class PlainConvUNet(nn.Module):
    def __init__(self, widths=(2, 3, 4), convs=2):
        super().__init__()
        stages, cin = [], 1
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(StackedConvBlocks(convs, cin, w, 1 if i == 0 else 2)))
            cin = w
        self.encoder = _Encoder(stages)
        self.decoder = _Decoder(widths, convs)

    def forward(self, x):
        skips = self.encoder(x)
        return self.decoder(skips)


class ResidualEncoderUNet(PlainConvUNet):
    def __init__(self, widths=(2, 3), blocks=(1, 2), convs=2):
        nn.Module.__init__(self)
        stages = [StackedResidualBlocks(n, widths[max(i - 1, 0)], w, 1 if i == 0 else 2)
                  for i, (w, n) in enumerate(zip(widths, blocks))]
        self.encoder = _Encoder(stages, stem=StackedConvBlocks(1, 1, widths[0]))
        self.decoder = _Decoder(widths, convs)


# --- fast neural style (pytorch/examples) ---------------------------------------------------------

class ConvLayer(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1):
        super().__init__()
        self.reflection_pad = nn.ReflectionPad2d(kernel // 2)
        self.conv2d = nn.Conv2d(cin, cout, kernel, stride)

    def forward(self, x):
        return self.conv2d(self.reflection_pad(x))


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1, self.in1 = ConvLayer(channels, channels, 3), nn.InstanceNorm2d(channels,
                                                                                  affine=True)
        self.conv2, self.in2 = ConvLayer(channels, channels, 3), nn.InstanceNorm2d(channels,
                                                                                  affine=True)
        self.relu = nn.ReLU()

    def forward(self, x):
        residual = x
        out = self.relu(self.in1(self.conv1(x)))
        out = self.in2(self.conv2(out))
        out = out + residual
        return out


class UpsampleConvLayer(ConvLayer):
    def __init__(self, cin, cout, kernel, upsample=None):
        super().__init__(cin, cout, kernel)
        self.upsample = upsample

    def forward(self, x):
        if self.upsample:
            x = nn.functional.interpolate(x, mode="nearest", scale_factor=self.upsample)
        return self.conv2d(self.reflection_pad(x))


class TransformerNet(nn.Module):
    """Three conv-norm-ReLU layers, five residual blocks, two upsampling conv-norm-ReLU layers:
    one ReLU module after every norm but the residual blocks' second."""

    def __init__(self, w=2):
        super().__init__()
        self.conv1, self.in1 = ConvLayer(3, w, 9), nn.InstanceNorm2d(w, affine=True)
        self.conv2, self.in2 = ConvLayer(w, 2 * w, 3, 2), nn.InstanceNorm2d(2 * w, affine=True)
        self.conv3, self.in3 = ConvLayer(2 * w, 4 * w, 3, 2), nn.InstanceNorm2d(4 * w,
                                                                                affine=True)
        self.res1, self.res2, self.res3, self.res4, self.res5 = (ResidualBlock(4 * w)
                                                                 for _ in range(5))
        self.deconv1 = UpsampleConvLayer(4 * w, 2 * w, 3, upsample=2)
        self.in4 = nn.InstanceNorm2d(2 * w, affine=True)
        self.deconv2 = UpsampleConvLayer(2 * w, w, 3, upsample=2)
        self.in5 = nn.InstanceNorm2d(w, affine=True)
        self.deconv3 = ConvLayer(w, 3, 9)
        self.relu = nn.ReLU()

    def forward(self, X):
        y = self.relu(self.in1(self.conv1(X)))
        y = self.relu(self.in2(self.conv2(y)))
        y = self.relu(self.in3(self.conv3(y)))
        y = self.res1(y)
        y = self.res2(y)
        y = self.res3(y)
        y = self.res4(y)
        y = self.res5(y)
        y = self.relu(self.in4(self.deconv1(y)))
        y = self.relu(self.in5(self.deconv2(y)))
        y = self.deconv3(y)
        return y


# --- CycleGAN and pix2pix -------------------------------------------------------------------------

_cyclegan_norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), _cyclegan_norm(dim),
            nn.ReLU(True), nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True),
            _cyclegan_norm(dim))

    def forward(self, x):
        out = x + self.conv_block(x)
        return out


class ResnetGenerator(nn.Module):
    def __init__(self, ngf=2, n_blocks=2):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), _cyclegan_norm(ngf), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, 2, 1), _cyclegan_norm(
                ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, 2, 1, 1),
                       _cyclegan_norm(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, input):
        return self.model(input)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: conv, then (conv, norm, LeakyReLU(0.2)) x n_layers, then conv."""

    def __init__(self, ndf=2, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for n in range(1, n_layers + 1):
            cin, cout = ndf * min(2 ** (n - 1), 8), ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(cin, cout, 4, 2 if n < n_layers else 1, 1),
                       _cyclegan_norm(cout), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(cout, 1, 4, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, input):
        return self.model(input)


# --- StarGAN v2 and MUNIT -------------------------------------------------------------------------

class ResBlk(nn.Module):
    """StarGAN v2's encoder block: norms and a shared activation applied in helper methods."""

    def __init__(self, dim, actv):
        super().__init__()
        self.actv, self.normalize = actv, True
        self.conv1, self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1), nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.InstanceNorm2d(dim, affine=True)
        self.norm2 = nn.InstanceNorm2d(dim, affine=True)

    def _residual(self, x):
        if self.normalize:
            x = self.norm1(x)
        x = self.conv1(self.actv(x))
        if self.normalize:
            x = self.norm2(x)
        return self.conv2(self.actv(x))

    def forward(self, x):
        return (x + self._residual(x)) / 2 ** 0.5


class StarGANGenerator(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.from_rgb = nn.Conv2d(3, dim, 3, 1, 1)
        self.encode = nn.ModuleList(ResBlk(dim, nn.LeakyReLU(0.2)) for _ in range(2))
        self.to_rgb = nn.Sequential(nn.InstanceNorm2d(dim, affine=True), nn.LeakyReLU(0.2),
                                    nn.Conv2d(dim, 3, 1, 1, 0))

    def forward(self, x):
        x = self.from_rgb(x)
        for block in self.encode:
            x = block(x)
        return self.to_rgb(x)


class Conv2dBlock(nn.Module):
    """MUNIT's block: pad, conv, then norm and activation when present."""

    def __init__(self, cin, cout, activation=True):
        super().__init__()
        self.pad, self.conv = nn.ZeroPad2d(1), nn.Conv2d(cin, cout, 3)
        self.norm = nn.InstanceNorm2d(cout)
        self.activation = nn.ReLU(inplace=True) if activation else None

    def forward(self, x):
        x = self.conv(self.pad(x))
        if self.norm:
            x = self.norm(x)
        if self.activation:
            x = self.activation(x)
        return x


class MUNITResBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.model = nn.Sequential(Conv2dBlock(dim, dim), Conv2dBlock(dim, dim, False))

    def forward(self, x):
        residual = x
        out = self.model(x)
        out += residual
        return out


class MUNITContentEncoder(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.model = nn.Sequential(Conv2dBlock(3, dim), MUNITResBlock(dim), MUNITResBlock(dim))

    def forward(self, x):
        return self.model(x)


# --- what runs eagerly after a norm ---------------------------------------------------------------

_NORM_OPS = ("triton_instnorm.forward.default", "aten.native_batch_norm.default")
_ACTIVATION_OPS = {f"aten.{name}{suffix}.default" for name in (
    "relu", "leaky_relu", "silu", "gelu") for suffix in ("", "_")}
_ADD_OPS = ("aten.add.Tensor", "aten.add_.Tensor")


class _EagerOpsAfterNorms(TorchDispatchMode):
    """Counts activation and add ops that take a norm's output, or the output of such an add."""

    def __init__(self):
        super().__init__()
        self.counts = {"activation": 0, "add": 0}
        self.marked = {}  # storage address -> a tensor on it (kept alive: no address reuse)

    def _marked(self, t):
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.marked

    def _mark(self, t):
        self.marked[t.untyped_storage().data_ptr()] = t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in _NORM_OPS:
            self._mark(out[0])
        elif name in _ACTIVATION_OPS and self._marked(args[0]):
            self.counts["activation"] += 1
        elif name in _ADD_OPS and any(self._marked(a) for a in args[:2]):
            self.counts["add"] += 1
            self._mark(out)
        return out


def eager_ops_after_norms(model, x):
    """{"activation": n, "add": m}: activations and adds run on a norm's output in one forward
    (an add's output counts as such an output too)."""
    with torch.no_grad(), _EagerOpsAfterNorms() as mode:
        model(x)
    mode.marked.clear()
    return mode.counts


NETWORKS = {  # name -> (factory, input shape)
    "PlainConvUNet": (PlainConvUNet, (1, 1, 8, 8, 8)),
    "ResidualEncoderUNet": (ResidualEncoderUNet, (1, 1, 8, 8, 8)),
    "TransformerNet": (TransformerNet, (1, 3, 8, 8)),
    "ResnetGenerator": (ResnetGenerator, (1, 3, 8, 8)),
    "PatchGAN": (NLayerDiscriminator, (1, 3, 32, 32)),
    "StarGANv2": (StarGANGenerator, (1, 3, 8, 8)),
    "MUNIT": (MUNITContentEncoder, (1, 3, 8, 8)),
}
