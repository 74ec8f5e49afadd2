"""ResNet-18/34 encoder, classifier and U-Net: pinned counts, a PyTorch reference, shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from unet_jax.convert.resnet import resnet_params_from_torchvision, resnet_unet_params_from_torch
from unet_jax.models.resnet import (
    RESNET_PRESETS,
    RESNET_STAGE_SIZES,
    ResNetClassifier,
    ResNetEncoder,
    ResNetUNet,
    check_resnet_input_size,
    create_resnet,
)

R18, R34 = RESNET_STAGE_SIZES["resnet18"], RESNET_STAGE_SIZES["resnet34"]


def count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def abstract_variables(model, size: int = 64):
    x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --------------------------------------------------------------------------------------
# The PyTorch reference, written as torchvision's ResNet and smp's Unet define them
# --------------------------------------------------------------------------------------
class TorchBasicBlock(tnn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(inplanes, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class TorchResNet(tnn.Module):
    def __init__(self, layers, num_classes=0, in_channels=3):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = [TorchBasicBlock(inplanes, planes, 1 if i == 0 else 2)]
            blocks += [TorchBasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))
            inplanes = planes
        self.fc = tnn.Linear(512, num_classes) if num_classes else None  # smp deletes fc

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x)[-1], 1), 1))


def conv_bn_relu(c_in, c_out):  # smp's Conv2dReLU with use_batchnorm=True
    return tnn.Sequential(tnn.Conv2d(c_in, c_out, 3, padding=1, bias=False), tnn.BatchNorm2d(c_out), tnn.ReLU())


class TorchDecoderBlock(tnn.Module):
    def __init__(self, c_in, c_skip, c_out):
        super().__init__()
        self.conv1 = conv_bn_relu(c_in + c_skip, c_out)
        self.conv2 = conv_bn_relu(c_out, c_out)

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TorchUnetDecoder(tnn.Module):
    def __init__(self, encoder_channels=(64, 64, 128, 256, 512), decoder_channels=(256, 128, 64, 32, 16)):
        super().__init__()
        enc = list(encoder_channels)[::-1]
        in_ch = [enc[0], *decoder_channels[:-1]]
        skip_ch = [*enc[1:], 0]
        self.blocks = tnn.ModuleList(TorchDecoderBlock(i, s, o) for i, s, o in zip(in_ch, skip_ch, decoder_channels))

    def forward(self, feats):
        x, skips = feats[-1], feats[-2::-1]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


class TorchUnet(tnn.Module):  # smp.Unet(encoder_name="resnet34", classes, aux_params)
    def __init__(self, layers, classes=1, in_channels=3, aux_classes=0):
        super().__init__()
        self.encoder = TorchResNet(layers, 0, in_channels)
        self.decoder = TorchUnetDecoder()
        self.segmentation_head = tnn.Sequential(tnn.Conv2d(16, classes, 3, padding=1))
        if aux_classes:
            self.classification_head = tnn.Sequential(
                tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Identity(), tnn.Linear(512, aux_classes)
            )

    def forward(self, x):
        feats = self.encoder.features(x)
        mask = self.segmentation_head(self.decoder(feats))
        if hasattr(self, "classification_head"):
            return mask, self.classification_head(feats[-1])
        return mask


def randomised(module: tnn.Module, seed: int) -> tnn.Module:
    """Random weights and batch-norm statistics (so eval mode tests the running stats)."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, tnn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, (tnn.Conv2d, tnn.Linear)) and m.bias is not None:
            with torch.no_grad():
                m.bias.normal_(0.0, 0.1)
    return module.eval()


def numpy_state(module: tnn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def unet34():
    """A random smp-style ResNet-34 U-Net with a class head, its Flax twin and variables."""
    torch_model = randomised(TorchUnet(R34, classes=2, in_channels=3, aux_classes=3), seed=0)
    model = ResNetUNet(stage_sizes=R34, num_classes=2, in_channels=3, class_head=3)
    variables = resnet_unet_params_from_torch(numpy_state(torch_model), model)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    return torch_model, model, variables, x


@pytest.fixture(scope="module")
def resnet18():
    """A random torchvision-style ResNet-18 with a 3-class fc and its state dict."""
    torch_model = randomised(TorchResNet(R18, num_classes=3), seed=1)
    return torch_model, numpy_state(torch_model)


# --------------------------------------------------------------------------------------
# Pinned parameter counts
# --------------------------------------------------------------------------------------
def closed_form_encoder(stage_sizes, in_channels=3, widths=(64, 128, 256, 512)):
    """Trainable parameters of the ResNet encoder from its widths alone.

    Convolutions k*k*c_in*c_out (no bias), batch norm 2*c (scale and offset): the stem
    7x7 conv + BN, per BasicBlock two 3x3 conv + BN, per stage change a 1x1 conv + BN.
    """
    total = 7 * 7 * in_channels * widths[0] + 2 * widths[0]
    c_in = widths[0]
    for blocks, w in zip(stage_sizes, widths):
        for b in range(blocks):
            total += 9 * (c_in if b == 0 else w) * w + 2 * w + 9 * w * w + 2 * w
            if b == 0 and c_in != w:
                total += c_in * w + 2 * w
        c_in = w
    return total


def closed_form_decoder(classes, decoder=(256, 128, 64, 32, 16), encoder=(64, 64, 128, 256, 512)):
    """smp's U-Net decoder: per block conv3x3(c_in + skip -> c) + BN + conv3x3(c -> c) + BN,
    then the 3x3 head with bias."""
    enc = list(encoder)[::-1]
    total, c_in = 0, enc[0]
    for c, skip in zip(decoder, [*enc[1:], 0]):
        total += 9 * (c_in + skip) * c + 2 * c + 9 * c * c + 2 * c
        c_in = c
    return total + 9 * c_in * classes + classes


def test_encoder_parameter_counts():
    # torchvision resnet34: 21,797,672 with fc 512*1000 + 1000 = 513,000; resnet18:
    # 11,689,512 with the same fc.
    for sizes, pinned, torchvision_total in ((R34, 21_284_672, 21_797_672), (R18, 11_176_512, 11_689_512)):
        variables = abstract_variables(ResNetEncoder(stage_sizes=sizes))
        assert count(variables["params"]) == pinned == closed_form_encoder(sizes)
        assert pinned + 512 * 1000 + 1000 == torchvision_total
        assert pinned == sum(p.numel() for p in TorchResNet(sizes).parameters())
    # Running mean and variance: one pair per batch-norm channel.
    assert count(abstract_variables(ResNetEncoder(stage_sizes=R34))["batch_stats"]) == 17_024


def test_unet_and_classifier_parameter_counts():
    unet = abstract_variables(create_resnet("resnet34_unet", in_channels=3))
    # smp Unet("resnet34", classes=1) on RGB: the commonly quoted 24,436,369, checked here
    # against the PyTorch reference rather than taken on trust.
    assert count(unet["params"]) == 24_436_369
    assert 24_436_369 == closed_form_encoder(R34) + closed_form_decoder(1)
    assert 24_436_369 == sum(p.numel() for p in TorchUnet(R34, classes=1).parameters())
    # The preset's grayscale stem: 7*7*64*(3 - 1) = 6,272 fewer.
    assert count(abstract_variables(create_resnet("resnet34_unet"))["params"]) == 24_430_097
    assert count(abstract_variables(create_resnet("resnet18_unet"))["params"]) == 14_321_937

    for name, sizes, pinned in (("resnet34_classifier", R34, 21_286_211), ("resnet18_classifier", R18, 11_178_051)):
        variables = abstract_variables(create_resnet(name))  # num_classes=3, RGB
        assert count(variables["params"]) == pinned == closed_form_encoder(sizes) + 512 * 3 + 3
        assert pinned == sum(p.numel() for p in TorchResNet(sizes, num_classes=3).parameters())


def test_variable_tree_matches_the_converted_torch_weights(unet34, resnet18):
    _, model, variables, _ = unet34
    abstract = abstract_variables(model)
    shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)  # noqa: E731
    assert shapes(abstract) == shapes(variables)
    converted = resnet_params_from_torchvision(resnet18[1], classifier=True)
    assert shapes(abstract_variables(ResNetClassifier(stage_sizes=R18))) == shapes(converted)


# --------------------------------------------------------------------------------------
# Equality with the PyTorch reference (eval mode, float32)
# --------------------------------------------------------------------------------------
def test_encoder_features_match_torch(unet34):
    torch_model, model, variables, x = unet34
    encoder = ResNetEncoder(stage_sizes=R34)
    enc_vars = {c: variables[c]["encoder"] for c in variables}
    feats = encoder.apply(enc_vars, x, train=False)
    with torch.no_grad():
        expected = torch_model.encoder.features(to_nchw(x))
    assert [f.shape for f in feats] == [
        (2, 32, 32, 64),
        (2, 16, 16, 64),
        (2, 8, 8, 128),
        (2, 4, 4, 256),
        (2, 2, 2, 512),
    ]
    for ours, theirs in zip(feats, expected):
        assert rel_err(ours, to_nhwc(theirs)) <= 1e-4


def test_unet_mask_and_class_logits_match_torch(unet34):
    torch_model, model, variables, x = unet34
    out = model.apply(variables, x, train=False)
    with torch.no_grad():
        mask, logits = torch_model(to_nchw(x))
    assert set(out) == {"mask", "class"}
    assert out["mask"].shape == (2, 64, 64, 2) and out["mask"].dtype == jnp.float32
    assert out["class"].shape == (2, 3) and out["class"].dtype == jnp.float32
    assert rel_err(out["mask"], to_nhwc(mask)) <= 1e-4
    assert rel_err(out["class"], logits.numpy()) <= 1e-4


def test_classifier_logits_match_torchvision_layout(resnet18):
    torch_model, state = resnet18
    variables = resnet_params_from_torchvision(state, classifier=True)
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    logits = create_resnet("resnet18_classifier").apply(variables, x)
    with torch.no_grad():
        expected = torch_model(to_nchw(x)).numpy()
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert rel_err(logits, expected) <= 1e-4


def test_grayscale_stem_equals_the_rgb_network_on_a_repeated_image(resnet18):
    # smp's rule for a 1-channel input: the RGB stem summed over its input channels.
    torch_model, state = resnet18
    gray = np.random.default_rng(2).normal(size=(1, 64, 64, 1)).astype(np.float32)
    variables = resnet_params_from_torchvision(state, in_channels=1)  # fc ignored
    assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)
    feats = ResNetEncoder(stage_sizes=R18, in_channels=1).apply(variables, gray)
    with torch.no_grad():
        expected = torch_model.features(to_nchw(np.repeat(gray, 3, axis=-1)))
    for ours, theirs in zip(feats, expected):
        assert rel_err(ours, to_nhwc(theirs)) <= 1e-4


def test_train_mode_updates_batch_stats_as_torch(resnet18):
    # Train mode normalises with the batch statistics and moves the running mean by
    # torch's momentum 0.1 (Flax 0.9). torch's running variance takes the *unbiased*
    # batch variance, Flax's the biased one: they differ by the factor n / (n - 1).
    torch_model, state = resnet18
    variables = resnet_params_from_torchvision(state)
    # 64x64: layer4 sees 2 x 2 x 2 values per channel (at 32x32 only 2, too few for a
    # well-conditioned variance).
    x = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
    feats, updated = ResNetEncoder(stage_sizes=R18).apply(variables, x, train=True, mutable=["batch_stats"])
    torch_model.train()
    try:
        with torch.no_grad():
            expected = torch_model.features(to_nchw(x))
    finally:
        torch_model.eval()
    for ours, theirs in zip(feats, expected):
        assert rel_err(ours, to_nhwc(theirs)) <= 1e-4
    old, new = variables["batch_stats"]["bn1"], updated["batch_stats"]["bn1"]
    assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])
    np.testing.assert_allclose(new["mean"], torch_model.bn1.running_mean.numpy(), rtol=1e-4, atol=1e-5)
    n = 2 * 32 * 32  # the stem's batch-norm sees N * H/2 * W/2 values per channel
    torch_unbiased = (torch_model.bn1.running_var.numpy() - 0.9 * old["var"]) / 0.1
    ours_biased = (np.asarray(new["var"]) - 0.9 * np.asarray(old["var"])) / 0.1
    np.testing.assert_allclose(ours_biased * n / (n - 1), torch_unbiased, rtol=1e-3)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})  # restore


# --------------------------------------------------------------------------------------
# Shapes, sizes, dtypes, presets
# --------------------------------------------------------------------------------------
def test_unet_output_shape_equals_input_and_bfloat16_gives_float32_logits(unet34):
    _, model, variables, x = unet34
    mask_only = model.clone(class_head=0)
    params = {c: {k: v for k, v in variables[c].items() if k != "class_head"} for c in variables}
    y = mask_only.apply(params, x)
    assert isinstance(y, jax.Array) and y.shape == (2, 64, 64, 2)
    y16 = mask_only.clone(dtype=jnp.bfloat16).apply(params, x)
    assert y16.dtype == jnp.float32 and y16.shape == y.shape
    assert rel_err(y16, y) < 0.1  # bfloat16 keeps ~3 significant digits per layer
    # Non-square inputs and the preset (grayscale, one class) through shape evaluation.
    model1 = create_resnet("resnet34_unet", dtype=jnp.bfloat16)
    out = jax.eval_shape(
        lambda v, x: model1.apply(v, x), abstract_variables(model1), jax.ShapeDtypeStruct((3, 96, 160, 1), jnp.float32)
    )
    assert out.shape == (3, 96, 160, 1) and out.dtype == jnp.float32


def test_input_sizes_that_are_not_multiples_of_32_are_refused():
    model = create_resnet("resnet18_unet")
    with pytest.raises(ValueError, match=r"input height 100 is not a multiple of 32.*nearest valid sizes: 96 or 128"):
        model.init(jax.random.key(0), jnp.ones((1, 100, 64, 1)))
    with pytest.raises(ValueError, match=r"input width 20 is not a multiple of 32.*nearest valid sizes: 32$"):
        check_resnet_input_size((64, 20))
    with pytest.raises(ValueError, match=r"input height must be a positive integer, got 0"):
        check_resnet_input_size((0, 64))
    assert check_resnet_input_size((96, 128)) == (96, 128)
    with pytest.raises(ValueError, match=r"input must be \(batch, height, width, 1\), got shape \(1, 64, 64, 3\)"):
        model.init(jax.random.key(0), jnp.ones((1, 64, 64, 3)))


def test_presets_and_overrides():
    assert sorted(RESNET_PRESETS) == ["resnet18_classifier", "resnet18_unet", "resnet34_classifier", "resnet34_unet"]
    assert create_resnet("resnet34_unet").stage_sizes == (3, 4, 6, 3)
    assert create_resnet("resnet18_classifier", num_classes=5).num_classes == 5
    with pytest.raises(
        ValueError, match=r"unknown ResNet preset 'resnet50_unet'; expected one of \['resnet18_classifier'"
    ):
        create_resnet("resnet50_unet")
    with pytest.raises(ValueError, match=r"unknown ResNetUNet field\(s\) \['classes'\]"):
        create_resnet("resnet34_unet", classes=2)


def test_stem_for_other_channel_counts_copies_rgb_cyclically_scaled(resnet18):
    """smp's rule for n != 1, 3 input channels: channel i takes RGB channel i % 3, x 3/n."""
    _, state = resnet18
    kernel = resnet_params_from_torchvision(state, in_channels=4)["params"]["conv1"]["kernel"]
    want = (state["conv1.weight"][:, [0, 1, 2, 0]] * 3 / 4).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(kernel, want, rtol=1e-6)


def test_converter_lists_missing_unexpected_and_mismatched_keys(resnet18):
    state = dict(resnet18[1])
    del state["layer2.0.downsample.1.running_var"]
    state["layer9.weight"] = np.zeros(1, np.float32)
    state["layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(ValueError) as info:
        resnet_params_from_torchvision(state, stage_sizes=R18)
    message = str(info.value)
    assert "1 missing key(s): layer2.0.downsample.1.running_var;" in message
    assert "1 unexpected key(s): layer9.weight;" in message
    assert "layer1.0.conv1.weight: expected (64, 64, 3, 3), found (64, 64, 1, 1)" in message
    with pytest.raises(ValueError, match=r"\d+ missing key\(s\): .*layer3.2.conv1.weight"):
        resnet_params_from_torchvision(resnet18[1], stage_sizes=R34)  # a ResNet-18 is not a 34
