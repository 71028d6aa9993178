"""Tests of the model zoo: every ``conf/model/*.yaml`` against the ``StagedModel`` contract.

Inputs are tiny (batch 2, mostly 16-32 px) and torch runs single-threaded here, so the suite stays
fast on a shared 2-core machine; the expensive cases (WRN-28-10, the ResNet-50s at 32 px and up)
are marked ``slow``. Parameter counts are checked twice: exactly against independent closed-form
or torchvision-derived figures, and within 2% of the published counts.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import kdrun.models as zoo
from kdrun.models import MODEL_NAMES, StagedModel, create_model
from kdrun.models.resnet import ShortcutA

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
CONFIG_NAMES = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
SPEC_NAMES = {
    "resnet8", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "resnet18", "resnet34", "resnet50", "preact_resnet18", "wrn_16_2", "wrn_40_2", "wrn_28_10",
    "tv_resnet18", "tv_resnet50", "small_cnn",
}  # fmt: skip
# forward (+backward) of these at 28-32 px takes seconds on one CPU thread
HEAVY = {"wrn_28_10", "resnet50", "tv_resnet50", "resnet34", "resnet32x4"}


def _params(name_or_model, **kw) -> int:
    if isinstance(name_or_model, nn.Module):
        return sum(p.numel() for p in name_or_model.parameters())
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return _params(build(name_or_model, **kw))


def build(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    return instantiate(cfg, num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def _names(heavy_slow: bool = True):
    """Config names; ``wrn_28_10`` (36M params) is always slow, ``HEAVY`` ones if asked."""
    slow = HEAVY if heavy_slow else {"wrn_28_10"}
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in CONFIG_NAMES]


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # other jobs share the 2 cores: oversubscribed OpenMP threads are 5-10x slower than one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- registry / configs
def test_model_names_match_configs_and_spec():
    assert sorted(MODEL_NAMES) == CONFIG_NAMES
    assert SPEC_NAMES <= set(CONFIG_NAMES)
    assert len(MODEL_NAMES) == len(set(MODEL_NAMES))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_targets_exported_staged_class(name):
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    module, _, cls_name = cfg._target_.rpartition(".")
    assert module == "kdrun.models"
    cls = getattr(zoo, cls_name)
    assert issubclass(cls, StagedModel) and cls_name in zoo.__all__


def test_create_model_matches_instantiate_and_takes_overrides():
    torch.manual_seed(0)
    a = create_model("resnet8", num_classes=7, in_channels=1, image_size=8)
    torch.manual_seed(0)
    b = build("resnet8", num_classes=7, in_channels=1, image_size=8)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    w = create_model("wrn_16_2", num_classes=10, dropout=0.3)
    drops = [m for m in w.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 6 and all(d.p == 0.3 for d in drops)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet9000", num_classes=10)


# --------------------------------------------------------------------------- forward contract
def _check_contract(model: StagedModel, x: torch.Tensor, num_classes: int) -> None:
    model.eval()
    n_stages = len(model.stage_channels)
    assert len(model.stages) == n_stages == len(model.stage_strides) == len(model.stage_blocks)
    assert model.feature_dim == model.classifier.in_features == model.stage_channels[-1]
    assert model.num_classes == num_classes
    assert _first_conv(model.stem).in_channels == x.shape[1]
    with torch.no_grad():
        h = model.stem(x)
        assert h.shape[1] == model.stem_channels
        outs, feat, logits = model.forward_stages(x)
        plain = model(x)
        pooled = model.pool_features(x)
    assert len(outs) == n_stages
    size = h.shape[-1]
    for out, c, s in zip(outs, model.stage_channels, model.stage_strides):
        size = math.ceil(size / s)
        assert out.shape == (x.shape[0], c, size, size)
    assert feat.shape == (x.shape[0], model.feature_dim)
    assert logits.shape == (x.shape[0], num_classes)
    torch.testing.assert_close(logits, plain)
    with torch.no_grad():
        via_forward = model(x, return_stages=True)
    torch.testing.assert_close(via_forward, (outs, feat, logits))
    torch.testing.assert_close(pooled, feat)
    # pool = (final BN+ReLU for pre-activation nets) + global average pool
    with torch.no_grad():
        expect = model.final_norm(outs[-1]).mean(dim=(2, 3))
        torch.testing.assert_close(model.pool(outs[-1]), expect)
        torch.testing.assert_close(model.classifier(feat), logits)
    assert model.preact == (not isinstance(model.final_norm, nn.Identity))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", _names())
@pytest.mark.parametrize("case", [(10, 1, 28), (100, 3, 32)], ids=["c10-gray28", "c100-rgb32"])
def test_forward_contract(name, case):
    num_classes, ch, size = case
    torch.manual_seed(0)
    model = build(name, num_classes, ch, size)
    _check_contract(model, torch.randn(2, ch, size, size), num_classes)


@pytest.mark.parametrize("name", ["small_cnn", "resnet8", "resnet20"])
def test_8x8_input(name):
    torch.manual_seed(0)
    model = build(name, 10, 1, 8)
    x = torch.randn(4, 1, 8, 8)
    _check_contract(model, x, 10)
    outs, _, _ = model.forward_stages(x)
    assert min(o.shape[-1] for o in outs) >= 2
    model.train()
    F.cross_entropy(model(x), torch.arange(4)).backward()


@pytest.mark.parametrize(
    "name",
    ["tv_resnet18", "resnet20", "small_cnn", pytest.param("tv_resnet50", marks=pytest.mark.slow)],
)
def test_imagenet_size_input_uses_imagenet_stem(name):
    torch.manual_seed(0)
    model = build(name, 10, 3, 224)
    assert any(isinstance(m, nn.MaxPool2d) for m in model.stem.modules())
    assert _first_conv(model.stem).kernel_size == (7, 7)
    x = torch.randn(2, 3, 224, 224)
    _check_contract(model, x, 10)
    with torch.no_grad():
        assert model.stem(x).shape[-1] == 56  # 7x7/2 conv + 3x3/2 max-pool


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_small_inputs_use_cifar_stem(name):
    with torch.device("meta"):
        model = build(name, 10, 1, 32)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.stem.modules())
    conv = _first_conv(model.stem)
    assert conv.in_channels == 1 and conv.kernel_size == (3, 3)


# --------------------------------------------------------------------------- make_stage / heads
@pytest.mark.parametrize("name", _names(heavy_slow=False))
def test_make_stage_maps_stage_inputs(name):
    torch.manual_seed(0)
    model = build(name, 10, 3, 16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        outs, _, _ = model.forward_stages(x)
        inputs = [model.stem(x), *outs[:-1]]
        assert model.stage_in_channels == [t.shape[1] for t in inputs]
        for k, (inp, out) in enumerate(zip(inputs, outs)):
            fresh = model.make_stage_like(k).eval()
            assert fresh(inp).shape == out.shape
            # same block types and size as the original stage, but its own new tensors
            assert [type(m) for m in fresh.modules()] == [
                type(m) for m in model.stages[k].modules()
            ]
            assert _params(fresh) == _params(model.stages[k])
            own = {p.data_ptr() for p in model.parameters()}
            assert not own & {p.data_ptr() for p in fresh.parameters()}
            # explicit call with the stage's own hyper-parameters, block count from the default
            again = model.make_stage(
                model.stage_in_channels[k], model.stage_channels[k], model.stage_strides[k]
            )
            assert again.eval()(inp).shape == out.shape
        # LSSKD: the last head gets one extra stride-1 stage of the final width
        c = model.stage_channels[-1]
        extra = model.make_stage(c, c, 1).eval()
        assert extra(outs[-1]).shape == outs[-1].shape
        head_pool = model.make_pool(c)
        assert head_pool(extra(outs[-1])).shape == (2, c)
        assert _params(head_pool) == _params(model.final_norm)


@pytest.mark.parametrize("name", _names(heavy_slow=False))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = build(name, 10, 3, 16).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


# --------------------------------------------------------------------------- parameter counts
def _cifar_resnet_count(depth, widths, stem, classes, in_ch=3, option="B") -> int:
    n = (depth - 2) // 6
    total = 9 * in_ch * stem + 2 * stem
    c_in = stem
    for i, c in enumerate(widths):
        for b in range(n):
            cin, stride = (c_in, 1 if i == 0 else 2) if b == 0 else (c, 1)
            total += 9 * cin * c + 9 * c * c + 4 * c  # two convs, two BNs
            if (cin != c or stride != 1) and option == "B":
                total += cin * c + 2 * c  # 1x1 conv + BN projection
        c_in = c
    return total + widths[-1] * classes + classes


def _wrn_count(depth, k, classes, in_ch=3) -> int:
    n = (depth - 4) // 6
    total, c_in = 9 * in_ch * 16, 16
    for c in (16 * k, 32 * k, 64 * k):
        for b in range(n):
            cin = c_in if b == 0 else c
            total += 2 * cin + 9 * cin * c + 2 * c + 9 * c * c  # bn1, conv1, bn2, conv2
            if cin != c:
                total += cin * c  # 1x1 shortcut, no BN
        c_in = c
    return total + 2 * 64 * k + 64 * k * classes + classes  # final BN, fc


def _tv_count(arch: str, classes: int, cifar_stem: bool) -> int:
    """torchvision's ResNet count with the stem conv and classifier swapped."""
    with torch.device("meta"):
        tv = getattr(torchvision.models, arch)(weights=None)
    total = _params(tv) - _params(tv.fc) + tv.fc.in_features * classes + classes
    if cifar_stem:
        total += 9 * 3 * 64 - 49 * 3 * 64
    return total


@pytest.mark.parametrize(
    "name,depth,widths,stem",
    [
        ("resnet8", 8, (16, 32, 64), 16),
        ("resnet20", 20, (16, 32, 64), 16),
        ("resnet32", 32, (16, 32, 64), 16),
        ("resnet56", 56, (16, 32, 64), 16),
        ("resnet110", 110, (16, 32, 64), 16),
        ("resnet8x4", 8, (64, 128, 256), 32),
        ("resnet32x4", 32, (64, 128, 256), 32),
    ],
)
def test_cifar_resnet_param_count_closed_form(name, depth, widths, stem):
    for classes in (10, 100):
        assert _params(name, num_classes=classes) == _cifar_resnet_count(
            depth, widths, stem, classes
        )


@pytest.mark.parametrize("name,depth,k", [("wrn_16_2", 16, 2), ("wrn_40_2", 40, 2), ("wrn_28_10", 28, 10)])  # fmt: skip
def test_wrn_param_count_closed_form(name, depth, k):
    for classes in (10, 100):
        assert _params(name, num_classes=classes) == _wrn_count(depth, k, classes)


@pytest.mark.parametrize(
    "name,arch", [("resnet18", "resnet18"), ("resnet34", "resnet34"), ("resnet50", "resnet50"),
                  ("tv_resnet18", "resnet18"), ("tv_resnet50", "resnet50")],
)  # fmt: skip
def test_resnet_param_counts_equal_torchvision(name, arch):
    assert _params(name, num_classes=100) == _tv_count(arch, 100, cifar_stem=True)
    assert _params(name, num_classes=1000, image_size=224) == _tv_count(arch, 1000, False)


def test_preact_resnet18_param_count():
    # post-activation ResNet-18 minus the stem BN (128) and the 3 shortcut BNs (2*(128+256+512)),
    # minus the narrower bn1 of each stage's first block (2*(64+128+256) vs 2*(128+256+512)),
    # plus the final BN (2*512)
    expected = _tv_count("resnet18", 100, True) - 128 - 1792 - 896 + 1024
    assert _params("preact_resnet18", num_classes=100) == expected


# published counts: He et al. 2016 Table 6 and Zagoruyko & Komodakis 2016 Table (CIFAR-10);
# ResNet-18 / PreAct ResNet-18 / ResNet-32x4 as reported on CIFAR-100 (CRD, PS-KD, CS-KD).
PUBLISHED = [
    ("resnet20", 10, 0.27e6),
    ("resnet56", 10, 0.86e6),
    ("resnet110", 10, 1.7e6),
    ("wrn_40_2", 10, 2.2e6),
    ("wrn_28_10", 10, 36.5e6),
    ("resnet18", 100, 11.2e6),
    ("preact_resnet18", 100, 11.2e6),
    ("resnet32x4", 100, 7.4e6),
]


@pytest.mark.parametrize("name,classes,published", PUBLISHED)
def test_param_counts_match_published(name, classes, published):
    assert abs(_params(name, num_classes=classes) / published - 1) < 0.02


def test_option_a_shortcut():
    with torch.device("meta"):
        a = zoo.CifarResNet(num_classes=10, depth=20, shortcut="A")
    assert _params(a) == _cifar_resnet_count(20, (16, 32, 64), 16, 10, option="A") == 269_722
    assert _params("resnet20", num_classes=10) - _params(a) == 16 * 32 + 32 * 64 + 2 * (32 + 64)
    x = torch.randn(2, 3, 5, 5)
    y = ShortcutA(3, 8, 2)(x)
    assert y.shape == (2, 8, 3, 3)
    torch.testing.assert_close(y[:, :3], x[:, :, ::2, ::2])
    assert not y[:, 3:].any()
    torch.manual_seed(0)
    _check_contract(
        zoo.CifarResNet(num_classes=10, depth=8, shortcut="A"), torch.randn(2, 3, 8, 8), 10
    )


# --------------------------------------------------------------------------- details
def test_torchvision_wrapper_computes_torchvision_function():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    ours = zoo.TorchvisionResNet(num_classes=10, image_size=64, arch="resnet18").eval()
    ours.load_torchvision_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "tv_resnet18"])
def test_zero_init_residual_makes_blocks_identity(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, image_size=16, zero_init_residual=True).eval()
    block = model.stages[0][-1]  # identity shortcut: in == out, stride 1
    x = torch.randn(2, model.stage_channels[0], 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(x))
    fresh = model.make_stage_like(1)
    last_bns = [m for m in fresh.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(not bn.weight.any() for bn in last_bns)
    off = create_model(name, num_classes=10, image_size=16)
    assert all(bn.weight.all() for bn in off.modules() if isinstance(bn, nn.BatchNorm2d))


@pytest.mark.parametrize(
    "size,strides,spatial", [(8, [1, 2, 2], [8, 4, 2]), (28, [2, 2, 2], [7, 4, 2]), (32, [2, 2, 2], [8, 4, 2])]
)  # fmt: skip
def test_small_cnn_resolution_plan(size, strides, spatial):
    model = zoo.SmallCNN(num_classes=10, in_channels=1, image_size=size).eval()
    assert model.stage_strides == strides
    with torch.no_grad():
        outs, _, _ = model.forward_stages(torch.randn(2, 1, size, size))
    assert [o.shape[-1] for o in outs] == spatial
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize(
    "ctor,kwargs",
    [
        (zoo.CifarResNet, {"depth": 21}),
        (zoo.CifarResNet, {"shortcut": "C"}),
        (zoo.WideResNet, {"depth": 27}),
        (zoo.ResNet, {"block": "dense"}),
        (zoo.SmallCNN, {"stem": "huge"}),
        (zoo.TorchvisionResNet, {"arch": "vgg11"}),
        (zoo.PreActResNet, {"stem": "tiny"}),
    ],
)
def test_bad_arguments_are_rejected(ctor, kwargs):
    with pytest.raises(ValueError):
        ctor(num_classes=10, **kwargs)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_configs_pass_the_config_validator(name):
    config = pytest.importorskip("kdrun.config")
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    config.check_target_node("model", cfg, ("num_classes", "in_channels", "image_size"))


@pytest.mark.parametrize(
    "name,key,value",
    [("resnet20", "stem", "huge"), ("resnet20", "shortcut", "C"), ("wrn_16_2", "dropout", 1.5),
     ("resnet18", "block", "dense"), ("tv_resnet18", "arch", "vgg11"), ("small_cnn", "convs_per_stage", 0)],
)  # fmt: skip
def test_config_validator_rejects_bad_model_values(name, key, value):
    config = pytest.importorskip("kdrun.config")
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    cfg[key] = value
    with pytest.raises(config.ConfigError, match=key):
        config.check_target_node("model", cfg, ("num_classes", "in_channels", "image_size"))
