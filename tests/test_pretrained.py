"""Published ResNet34 weights (lcssl.pretrained): a torchvision state dict saved to .safetensors gives,
through lcssl's encoder, the features of torchvision's ResNet34 forward (written here in float64
numpy with torchvision's key names: conv, eval-mode batch norm, ReLU, max-pool, BasicBlock)."""
import json
import pathlib
import pickle
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.numpy import save_file

from lcssl import models, pretrained
from lcssl.errors import UserError
from lcssl.models.unet import ResNetEncoder
from tests._train_helpers import PYTHON, ROOT, cli_env, compilation_cache, run_cli, tiny_dataset

STAGES, WIDTHS = (3, 4, 6, 3), (64, 128, 256, 512)


def random_resnet34_state_dict(seed=0) -> dict:
    """torchvision.models.resnet34()'s keys and shapes, random values (BN stats included), float32."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, out, inp, k):
        sd[f"{name}.weight"] = rng.normal(0, np.sqrt(2 / (inp * k * k)), (out, inp, k, k))

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.2, c)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c)
        sd[f"{name}.num_batches_tracked"] = np.array(7)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inp = 64
    for s, (n, w) in enumerate(zip(STAGES, WIDTHS), start=1):
        for b in range(n):
            conv(f"layer{s}.{b}.conv1", w, inp if b == 0 else w, 3)
            bn(f"layer{s}.{b}.bn1", w)
            conv(f"layer{s}.{b}.conv2", w, w, 3)
            bn(f"layer{s}.{b}.bn2", w)
            if b == 0 and s > 1:
                conv(f"layer{s}.{b}.downsample.0", w, inp, 1)
                bn(f"layer{s}.{b}.downsample.1", w)
        inp = w
    sd["fc.weight"], sd["fc.bias"] = rng.normal(0, 0.01, (1000, 512)), np.zeros(1000)
    return {k: v.astype(np.int64 if k.endswith("tracked") else np.float32) for k, v in sd.items()}


# --- torchvision's ResNet34 forward, float64 numpy, NCHW, torchvision's key names ----------------

def conv2d(x, w, stride, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    windows = sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]  # [N, I, H', W', k, k]
    return np.einsum("nihwab,oiab->nohw", windows, w)


def batch_norm(x, sd, name, eps=1e-5):  # eval mode: running statistics
    shape = (1, -1, 1, 1)
    scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + eps)
    return (x - sd[f"{name}.running_mean"].reshape(shape)) * scale.reshape(shape) + sd[f"{name}.bias"].reshape(shape)


def max_pool_3x3_s2_p1(x):
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-1, -2))


def torchvision_resnet34_features(sd, x):
    """x [N, 3, H, W] -> [relu(bn1(conv1)), layer1, layer2, layer3, layer4] as torchvision computes them."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    relu = lambda v: np.maximum(v, 0)
    x = relu(batch_norm(conv2d(x, sd["conv1.weight"], 2, 3), sd, "bn1"))
    feats = [x]
    x = max_pool_3x3_s2_p1(x)
    for s, n in enumerate(STAGES, start=1):
        for b in range(n):
            p = f"layer{s}.{b}"
            stride = 2 if (b == 0 and s > 1) else 1
            y = relu(batch_norm(conv2d(x, sd[f"{p}.conv1.weight"], stride, 1), sd, f"{p}.bn1"))
            y = batch_norm(conv2d(y, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = batch_norm(conv2d(x, sd[f"{p}.downsample.0.weight"], stride, 0), sd, f"{p}.downsample.1")
            x = relu(x + y)
        feats.append(x)
    return feats


# --- lcssl -----------------------------------------------------------------------------------------

def lcssl_features(params, batch_stats, x_nhwc):
    """lcssl's ResNetEncoder in float64 (the mapping is then checked to float64 rounding)."""
    with jax.enable_x64(True):
        as64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
        levels = ResNetEncoder(dtype=jnp.float64).apply(
            {"params": as64(params), "batch_stats": as64(batch_stats)}, jnp.asarray(x_nhwc, jnp.float64))
        return [np.asarray(level, np.float64) for level in levels]


def assert_same_features(got_nhwc, want_nchw):
    assert len(got_nhwc) == len(want_nchw) == 5
    for level, (g, w) in enumerate(zip(got_nhwc, want_nchw)):
        w = w.transpose(0, 2, 3, 1)
        assert g.shape == w.shape, level
        # Both in float64 from the same float32 weights: only the summation order differs (~1e-15
        # relative per operation, a few hundred operations deep).
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10 * np.abs(w).max(), err_msg=f"level {level}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    sd = random_resnet34_state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet34.safetensors"
    save_file(sd, str(path))
    return sd, str(path)


@pytest.mark.slow
def test_torchvision_resnet34_file_gives_torchvisions_features(weights):
    sd, path = weights
    params, stats, report = pretrained.resnet34_to_encoder(pretrained.read_state_dict(path), source=path,
                                                           bands=["R", "G", "B"])
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64))
    assert_same_features(lcssl_features(params, stats, x.transpose(0, 2, 3, 1)),
                         torchvision_resnet34_features(sd, x))
    assert report["not_used"] == sorted(["fc.bias", "fc.weight", *(k for k in sd if k.endswith("tracked"))])
    assert len(report["loaded"]) == len(sd) - len(report["not_used"])
    assert report["bands"] == {"copied": ["R", "G", "B"], "new_zero": []}
    # The params have exactly the structure and shapes of lcssl's ResNet34 encoder.
    want = ResNetEncoder().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    shapes = lambda t: jax.tree.map(lambda a: a.shape, t)
    assert shapes({"params": params, "batch_stats": stats}) == shapes(dict(want))


def test_bands_are_matched_by_name_and_the_others_start_at_zero(weights):
    sd, path = weights
    bands = ["NIR", "B", "R", "elevation", "G"]
    params, stats, report = pretrained.resnet34_to_encoder(pretrained.read_state_dict(path), source=path,
                                                           bands=bands)
    assert report["bands"] == {"copied": ["B", "R", "G"], "new_zero": ["NIR", "elevation"]}
    x5 = np.random.default_rng(2).normal(size=(1, 5, 32, 32))
    rgb = x5[:, [bands.index("R"), bands.index("G"), bands.index("B")]]
    # NIR and elevation do not change the features at the start: the pretrained RGB ones come out.
    assert_same_features(lcssl_features(params, stats, x5.transpose(0, 2, 3, 1)),
                         torchvision_resnet34_features(sd, rgb))


def test_prefixed_keys_of_smp_or_dataparallel_load(weights, tmp_path):
    sd, _ = weights
    path = str(tmp_path / "smp.safetensors")
    save_file({f"module.encoder.{k}": v for k, v in sd.items()}, path)
    params, _, _ = pretrained.resnet34_to_encoder(pretrained.read_state_dict(path), source=path,
                                                  bands=["R", "G", "B"])
    np.testing.assert_array_equal(params["stage4_block2"]["conv2"]["kernel"],
                                  sd["layer4.2.conv2.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("layer3.1.bn2.running_var"), "missing key 'layer3.1.bn2.running_var'"),
    (lambda sd: sd.update({"layer1.0.conv3.weight": np.zeros((256, 64, 1, 1), np.float32)}),
     r"unexpected key 'layer1.0.conv3.weight': the file looks like a bottleneck ResNet \(ResNet50"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("layer1.2.")],
     "missing key 'layer1.2.conv1.weight' of a torchvision ResNet34 .the file has no block layer1.2: a ResNet18"),
    (lambda sd: sd.update({"blocks.0.attn.qkv.weight": np.zeros((9, 3), np.float32)}),
     "unexpected key 'blocks.0.attn.qkv.weight': the file looks like neither a torchvision/timm ResNet34 nor an "
     "smp U-Net: its keys start with 'blocks.', 'bn1.', 'conv1.', 'fc.', 'layer1.', 'layer2.' ..."),
    (lambda sd: sd.update({"layer2.0.conv1.weight": np.zeros((96, 64, 3, 3), np.float32)}),
     r"layer2.0.conv1.weight has shape \(96, 64, 3, 3\), a ResNet34's is \(128, 64, 3, 3\)"),
    (lambda sd: sd.update({"conv1.weight": np.zeros((64, 6, 7, 7), np.float32)}), "6 input channels"),
])
def test_a_file_that_is_not_a_resnet34_is_refused_naming_file_and_key(weights, tmp_path, edit, message):
    sd = dict(weights[0])
    edit(sd)
    path = str(tmp_path / "bad.safetensors")
    save_file(sd, path)
    with pytest.raises(UserError, match=message) as e:
        pretrained.resnet34_to_encoder(pretrained.read_state_dict(path), source=path, bands=["R", "G", "B"])
    assert path in str(e.value) and "\n" not in str(e.value)


def test_other_inputs_are_refused_in_one_line(weights, tmp_path):
    _, path = weights
    with pytest.raises(UserError, match="lack \\['B'\\]"):
        pretrained.resnet34_to_encoder(pretrained.read_state_dict(path), source=path, bands=["R", "G", "IR"])
    with pytest.raises(UserError, match="model.stage_sizes"):
        pretrained.resnet34_to_encoder({}, source=path, bands=["R", "G", "B"], model_cfg=models.tiny_config())
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="junk.safetensors: not a readable"):
        pretrained.read_state_dict(str(tmp_path / "junk.safetensors"))
    with pytest.raises(UserError, match="no such file"):
        pretrained.read_state_dict(str(tmp_path / "absent.safetensors"))


# --- an smp Unet('resnet34') of IGN's FLAIR baselines: 5-band RGBIE stem, decoder, head -------------

DECODER = (256, 128, 64, 32, 16)


def random_smp_unet_state_dict(in_channels=5, classes=13, seed=0) -> dict:
    """segmentation_models_pytorch Unet('resnet34', in_channels, classes)'s keys and shapes, random values."""
    rng = np.random.default_rng(seed)
    enc = random_resnet34_state_dict(seed)
    enc.pop("fc.weight"), enc.pop("fc.bias")  # smp's encoder drops the classifier
    enc["conv1.weight"] = rng.normal(0, np.sqrt(2 / (in_channels * 49)), (64, in_channels, 7, 7)).astype(np.float32)
    sd = {f"encoder.{k}": v for k, v in enc.items()}
    in_ch = [512, *DECODER[:-1]]
    skip_ch = [256, 128, 64, 64, 0]
    for i, (inp, skip, out) in enumerate(zip(in_ch, skip_ch, DECODER)):
        for j, cin in ((1, inp + skip), (2, out)):
            p = f"decoder.blocks.{i}.conv{j}"
            sd[f"{p}.0.weight"] = rng.normal(0, np.sqrt(2 / (cin * 9)), (out, cin, 3, 3)).astype(np.float32)
            sd[f"{p}.1.weight"] = rng.uniform(0.5, 1.5, out).astype(np.float32)
            sd[f"{p}.1.bias"] = rng.normal(0, 0.1, out).astype(np.float32)
            sd[f"{p}.1.running_mean"] = rng.normal(0, 0.2, out).astype(np.float32)
            sd[f"{p}.1.running_var"] = rng.uniform(0.5, 2.0, out).astype(np.float32)
            sd[f"{p}.1.num_batches_tracked"] = np.array(3, np.int64)
    sd["segmentation_head.0.weight"] = rng.normal(0, 0.1, (classes, DECODER[-1], 3, 3)).astype(np.float32)
    sd["segmentation_head.0.bias"] = rng.normal(0, 0.1, classes).astype(np.float32)
    return sd


def smp_unet_logits(sd, x):
    """smp's Unet forward, float64 numpy NCHW: the ResNet34 features, then per decoder block nearest
    upsample x2, concatenate [x, skip], (conv3x3, eval BN, ReLU) x 2; head conv3x3 + bias."""
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    feats = torchvision_resnet34_features(enc, x)
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    relu = lambda v: np.maximum(v, 0)
    y, skips = feats[-1], [*reversed(feats[:-1]), None]
    for i, skip in enumerate(skips):
        y = np.repeat(np.repeat(y, 2, axis=2), 2, axis=3)
        if skip is not None:
            y = np.concatenate([y, skip], axis=1)
        for j in (1, 2):
            p = f"decoder.blocks.{i}.conv{j}"
            y = relu(batch_norm(conv2d(y, sd[f"{p}.0.weight"], 1, 1), sd, f"{p}.1"))
    return conv2d(y, sd["segmentation_head.0.weight"], 1, 1) + sd["segmentation_head.0.bias"].reshape(1, -1, 1, 1)


@pytest.mark.slow
def test_an_smp_flair_unet_loads_into_the_aerial_unet_and_computes_smps_logits(tmp_path):
    sd = random_smp_unet_state_dict()
    path = str(tmp_path / "flair_unet.safetensors")
    save_file(sd, path)
    bands = ["R", "G", "B", "NIR", "elevation"]
    params, stats, report = pretrained.smp_unet_to_aerial(pretrained.read_state_dict(path), source=path,
                                                          bands=bands, num_classes=13,
                                                          model_cfg=models.default_config())
    assert report["into"] == ["aerial_encoder", "aerial_decoder", "seg_head"]
    assert report["bands"] == {"copied": bands, "new_zero": [], "dropped": []}
    assert len(report["loaded"]) == len([k for k in sd if not k.endswith("tracked")])
    cfg = models.default_config()
    cfg.variant, cfg.num_classes = "unet", 13
    model = models.build_model(cfg).clone(dtype=jnp.float64)
    x = np.random.default_rng(1).normal(size=(1, 5, 64, 64))
    with jax.enable_x64(True):
        as64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
        want_tree = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 5)), None, None, None)
        shapes = lambda t: jax.tree.map(lambda a: a.shape, t)
        assert shapes({"params": params, "batch_stats": stats}) == shapes(dict(want_tree))
        got = model.apply({"params": as64(params), "batch_stats": as64(stats)},
                          jnp.asarray(x.transpose(0, 2, 3, 1)), None, None, None)["logits"]
    want = smp_unet_logits(sd, x).transpose(0, 2, 3, 1)
    # float64 on both sides from the same float32 weights: summation order only, ~40 layers deep.
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-9 * np.abs(want).max())


def test_an_smp_unet_maps_bands_by_name_and_refuses_what_lcssl_cannot_hold(tmp_path):
    sd = random_smp_unet_state_dict(classes=19)
    path = str(tmp_path / "unet.safetensors")
    save_file(sd, path)
    params, _, report = pretrained.smp_unet_to_aerial(pretrained.read_state_dict(path), source=path,
                                                      bands=["R", "G", "B", "IR"], num_classes=12)
    assert report["bands"] == {"copied": ["R", "G", "B", "IR"], "new_zero": [], "dropped": ["elevation"]}
    kernel = params["aerial_encoder"]["stem_conv"]["kernel"]
    np.testing.assert_array_equal(kernel[:, :, 3], sd["encoder.conv1.weight"][:, 3].transpose(1, 2, 0))
    assert "seg_head" not in params and "19 classes, the dataset card 12" in report["head_not_loaded"]
    save_file({**sd, "decoder.blocks.0.attention1.attention.1.weight": np.zeros((8, 768, 1, 1), np.float32)}, path)
    with pytest.raises(UserError, match="unexpected key 'decoder.blocks.0.attention1.attention.1.weight' "
                                        "of an smp U-Net: lcssl's decoder has no attention"):
        pretrained.smp_unet_to_aerial(pretrained.read_state_dict(path), source=path, bands=["R", "G", "B"],
                                      num_classes=19)
    cfg = models.default_config()
    cfg.decoder_channels = (128, 64, 32, 16, 8)
    with pytest.raises(UserError, match=r"model.decoder_channels=\(256, 128, 64, 32, 16\)"):
        pretrained.smp_unet_to_aerial(sd, source=path, bands=["R", "G", "B"], num_classes=19, model_cfg=cfg)
    # The ResNet34 reader alone names what such a file is.
    with pytest.raises(UserError, match="unexpected key 'decoder.blocks.0.conv1.0.weight': the file looks like an "
                                        "smp U-Net: this reader takes its encoder only"):
        pretrained.resnet34_to_encoder(sd, source=path, bands=["R", "G", "B"])


class TorchStandIn:
    """What `torch.load(path, map_location='cpu', weights_only=True)` returns for a file (torch is not
    a dependency of lcssl): tensors as objects with detach().cpu().numpy(), or the error torch raises
    when weights_only meets a pickled object that is not a tensor or a plain container."""

    class Tensor:
        def __init__(self, array):
            self.array = array

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.array

    def __init__(self, checkpoint=None, error=None):
        self.checkpoint, self.error = checkpoint, error

    def load(self, path, map_location, weights_only):
        assert map_location == "cpu" and weights_only is True  # never an arbitrary unpickle
        if self.error:
            raise self.error
        return {k: {n: self.Tensor(a) for n, a in v.items()} if k == "state_dict" else v
                for k, v in self.checkpoint.items()}


def test_ign_flair_training_checkpoints_load_as_smp_unets(tmp_path, monkeypatch):
    """IGN's FLAIR-1 / FLAIR-INC checkpoints: a PyTorch Lightning .ckpt whose state_dict holds the
    smp U-Net under 'model.seg_model.' beside the task's loss weights (IGN's loader keeps the former)."""
    sd = random_smp_unet_state_dict(classes=15)
    path = str(tmp_path / "FLAIR-INC_RGBIE_resnet34_unet.ckpt")
    pathlib.Path(path).write_bytes(b"a torch zip")
    lightning = {"epoch": 12, "global_step": 3400, "pytorch-lightning_version": "2.1.0",
                 "state_dict": {**{f"model.seg_model.{k}": v for k, v in sd.items()},
                                "criterion.weight": np.ones(15, np.float32)}}
    monkeypatch.setitem(sys.modules, "torch", TorchStandIn(lightning))
    state_dict = pretrained.read_state_dict(path)
    assert pretrained.is_smp_unet(state_dict)
    bands = ["R", "G", "B", "NIR", "elevation"]
    params, stats, report = pretrained.smp_unet_to_aerial(state_dict, source=path, bands=bands, num_classes=15)
    assert report["into"] == ["aerial_encoder", "aerial_decoder", "seg_head"]
    assert [k for k in report["not_used"] if not k.endswith("num_batches_tracked")] == ["criterion.weight"]
    assert report["bands"]["copied"] == bands
    np.testing.assert_array_equal(params["aerial_encoder"]["stem_conv"]["kernel"],
                                  sd["encoder.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["aerial_decoder"]["block4"]["conv2"]["kernel"],
                                  sd["decoder.blocks.4.conv2.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(stats["aerial_decoder"]["block0"]["bn1"]["var"],
                                  sd["decoder.blocks.0.conv1.1.running_var"])
    np.testing.assert_array_equal(params["seg_head"]["bias"], sd["segmentation_head.0.bias"])
    # The other wrappers of a model's keys: DataParallel, a Lightning task's attribute, IGN's model.
    for prefix in ("module.", "model.", "seg_model.", "module.model.seg_model."):
        assert pretrained.is_smp_unet({f"{prefix}{k}": v for k, v in sd.items()}), prefix
    # One it does not know: the hint says what the file is and what to do, not "a ResNet50 ...".
    with pytest.raises(UserError, match="unexpected key 'net.decoder.blocks.0.conv1.0.weight': the file looks "
                                        "like an smp U-Net under the prefix 'net.', which lcssl does not strip"):
        pretrained.resnet34_to_encoder({f"net.{k}": v for k, v in sd.items()}, source=path, bands=bands)
    # A checkpoint holding other Python objects (Lightning's hyper-parameters): refused, never unpickled.
    monkeypatch.setitem(sys.modules, "torch", TorchStandIn(
        error=pickle.UnpicklingError("Weights only load failed. This file can still be loaded ...\n"
                                     "WeightsUnpickler error: Unsupported global: GLOBAL omegaconf.DictConfig")))
    with pytest.raises(UserError, match=r"holds Python objects besides tensors, which lcssl does not unpickle") as e:
        pretrained.read_state_dict(path)
    assert "\n" not in str(e.value)


@flax.struct.dataclass
class _State:
    params: dict
    batch_stats: dict


def test_warm_start_replaces_only_the_aerial_encoder(weights):
    sd, path = weights
    cfg = models.default_config()
    encoder = ResNetEncoder().init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)))
    head = {"kernel": jnp.ones((3, 3))}
    state = _State(params={"aerial_encoder": encoder["params"], "seg_head": head},
                   batch_stats={"aerial_encoder": encoder["batch_stats"]})
    card = {"aerial": {"bands": ["R", "G", "B", "IR"]}}
    new, report = pretrained.warm_start(state, path, card, cfg)
    assert new.params["seg_head"] is head and report["new"] == ["seg_head"]
    np.testing.assert_array_equal(new.batch_stats["aerial_encoder"]["stage2_block0"]["downsample_bn"]["var"],
                                  sd["layer2.0.downsample.1.running_var"])
    kernel = np.asarray(new.params["aerial_encoder"]["stem_conv"]["kernel"])
    np.testing.assert_array_equal(kernel[:, :, :3], sd["conv1.weight"].transpose(2, 3, 1, 0))
    assert not kernel[:, :, 3].any() and report["bands"]["new_zero"] == ["IR"]
    assert len(report["sha256"]) == 64
    with pytest.raises(UserError, match="no 'aerial_encoder'"):
        pretrained.warm_start(_State(params={"utae": {}}, batch_stats={}), path, card, cfg)


@pytest.mark.slow
def test_fine_tuning_from_a_resnet34_file_with_the_real_command(weights, tmp_path_factory, tmp_path):
    sd, path = weights
    env = cli_env(compilation_cache(tmp_path_factory))
    data_dir = tiny_dataset(tmp_path_factory)
    command = ["-m", "lcssl.main", "--config=configs/sup_flair2.py:tiny", f"--workdir={tmp_path / 'ft'}",
               f"--config.data_dir={data_dir}", f"--config.supervised.init_encoder_from={path}",
               "--config.num_steps=2", "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2"]
    # The tiny model is no ResNet34: refused in one line before anything trains.
    tiny = subprocess.run([PYTHON, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert tiny.returncode == 2 and "Traceback" not in tiny.stderr, tiny.stderr[-3000:]
    assert f"error: supervised.init_encoder_from={path}: a ResNet34 needs model.stage_sizes" in tiny.stderr
    run_cli([*command, "--config.model.stage_sizes=(3, 4, 6, 3)", "--config.model.widths=(64, 128, 256, 512)",
             "--config.model.stem_width=64"], env=env)
    loaded = json.loads((tmp_path / "ft" / "loaded_weights.json").read_text())
    assert loaded["init_encoder_from"] == path and loaded["into"] == "aerial_encoder"
    assert loaded["bands"] == {"copied": ["R", "G", "B"], "new_zero": ["NIR", "elevation"]}
    assert "conv1.weight" in loaded["loaded"] and "aerial_decoder" in loaded["new"]
    test = json.loads((tmp_path / "ft" / "eval_results.json").read_text())["test"]
    assert len(test["official_classes"]) == 12 and "other" not in test["official_classes"]
    assert 0.0 <= test["miou_official"] <= 1.0
