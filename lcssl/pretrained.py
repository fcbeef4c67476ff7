"""Published encoder weights: a torchvision / timm ResNet34 state dict -> lcssl's U-Net encoder.

    state_dict = read_state_dict(path)                     # .safetensors (or .pth where torch is installed)
    params, stats, report = resnet34_to_encoder(state_dict, source=path, ...)
    state, report = warm_start(state, path, card)          # fine-tuning: --config.init_encoder_from=PATH

torchvision's `resnet34()` and timm's `resnet34` share their key names (conv1, bn1, layer1.0.conv1,
..., layer2.0.downsample.0/1, fc); smp's encoder is the same under 'encoder.', and checkpoints of
DataParallel or Lightning add 'module.' / 'model.': those prefixes are stripped. The mapping onto
`lcssl.models.unet.ResNetEncoder` (the 'aerial_encoder' subtree):

    conv1.weight [O, I, kh, kw]          -> stem_conv/kernel [kh, kw, I, O]
    bn1.weight, .bias                    -> stem_bn/scale, bias             (params)
    bn1.running_mean, .running_var       -> stem_bn/mean, var               (batch_stats)
    layer{s}.{b}.conv1/bn1/conv2/bn2     -> stage{s}_block{b}/conv1/bn1/conv2/bn2
    layer{s}.{b}.downsample.0 / .1       -> stage{s}_block{b}/downsample_conv / downsample_bn
    fc.*, num_batches_tracked            -> not used (the ImageNet classifier, a counter)

The two compute the same function: same paddings (7x7/2 pad 3, 3x3 pad 1, max-pool 3x3/2 pad 1 with
-inf padding), batch norm eps 1e-5 on both sides (tests/test_pretrained.py checks the features).

Bands: an ImageNet stem sees R, G, B. The dataset's bands are matched by name (any order); a band
the file does not have (NIR, IR, elevation) gets a zero kernel slice, as fine-tuning's adapt_bands
does. Zero rather than the mean of the RGB slices: with zeros the network computes exactly the
pretrained features of the RGB bands, so the stem's batch-norm running statistics still describe
its output; a mean-RGB slice would add a brightness-like response of an unrelated band (elevation)
on top, shifting every downstream activation away from what the statistics were estimated on.
The gradient of a zero slice is not zero (it is the input band times the upstream gradient), so
fine-tuning learns it. Input scaling is lcssl's (per-band standardisation from the dataset card),
not ImageNet's mean / std: the usual practice when fine-tuning on other imagery, and the batch
norms adapt in training mode.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from lcssl.errors import UserError

# ResNet34 (He et al. 2016, table 1): BasicBlocks per stage and widths; stem 64.
RESNET34_STAGES = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)
# torchvision / timm ImageNet weights take R, G, B in this order.
FILE_BANDS = ("R", "G", "B")
ENCODER_KEY = "aerial_encoder"  # the top-level param subtree the weights go to (lcssl.models.utt)
_PREFIXES = ("module.", "model.", "encoder.", "backbone.")
_IGNORED = re.compile(r"^fc\.|num_batches_tracked$")
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{key: array} of a .safetensors file, or of a .pth / .pt file where torch is installed."""
    if not os.path.isfile(path):
        raise UserError(f"init_encoder_from={path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"init_encoder_from={path}: not a readable .safetensors file ({e})") from None
    if path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError:
            raise UserError(f"init_encoder_from={path}: reading a .pth file needs torch, which is not "
                            "installed; convert it once where torch is (safetensors.torch.save_file("
                            "torch.load(path), 'weights.safetensors')) and pass the .safetensors file") from None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            raise UserError(f"init_encoder_from={path}: torch cannot read it ({type(e).__name__}: {e})") from None
        loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(loaded, Mapping):
            raise UserError(f"init_encoder_from={path}: expected a state dict, found {type(loaded).__name__}")
        return {k: v.detach().cpu().numpy() for k, v in loaded.items() if hasattr(v, "detach")}
    raise UserError(f"init_encoder_from={path}: expected a .safetensors file (or .pth / .pt with torch installed)")


def _strip_prefixes(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(state_dict)
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def _expected_keys(stages: Sequence[int]) -> dict[str, tuple[str, ...]]:
    """torchvision module prefix -> lcssl module path, for a BasicBlock ResNet with `stages`."""
    mapping = {"conv1": ("stem_conv",), "bn1": ("stem_bn",)}
    for s, n_blocks in enumerate(stages, start=1):
        for b in range(n_blocks):
            src, dst = f"layer{s}.{b}", f"stage{s}_block{b}"
            for name in ("conv1", "bn1", "conv2", "bn2"):
                mapping[f"{src}.{name}"] = (dst, name)
            if b == 0 and s > 1:
                mapping[f"{src}.downsample.0"] = (dst, "downsample_conv")
                mapping[f"{src}.downsample.1"] = (dst, "downsample_bn")
    return mapping


def resnet34_to_encoder(state_dict: Mapping[str, np.ndarray], *, source: str, bands: Sequence[str],
                        model_cfg: Mapping[str, Any] | None = None) -> tuple[dict, dict, dict]:
    """(params, batch_stats, report) of ResNetEncoder from a torchvision ResNet34 state dict.

    `bands`: the dataset's aerial band names (the stem's input channels, in order). `model_cfg`:
    lcssl's model config, checked to be ResNet34's (stage_sizes, widths, stem_width). Raises
    UserError naming `source` and the first key that is missing, unexpected or of the wrong shape.
    """
    if model_cfg is not None:
        have = (tuple(model_cfg["stage_sizes"]), tuple(model_cfg["widths"]), int(model_cfg["stem_width"]))
        if have != (RESNET34_STAGES, RESNET34_WIDTHS, 64):
            raise UserError(f"init_encoder_from={source}: a ResNet34 needs model.stage_sizes={RESNET34_STAGES}, "
                            f"model.widths={RESNET34_WIDTHS}, model.stem_width=64; this model has {have}")
    sd = _strip_prefixes(state_dict)
    mapping = _expected_keys(RESNET34_STAGES)
    for key in sorted(sd):
        module, _, _ = key.rpartition(".")
        if module not in mapping and not _IGNORED.search(key):
            raise UserError(f"init_encoder_from={source}: unexpected key {key!r}: not a torchvision/timm "
                            "ResNet34 (a ResNet50 has conv3 and 4 x width; a ResNet18 lacks layer1.2)")
    params: dict = {}
    batch_stats: dict = {}
    tree = {"params": params, "batch_stats": batch_stats}
    for src, dst in mapping.items():
        is_conv = "conv" in dst[-1]
        for leaf in (("weight",) if is_conv else tuple(_BN)):
            key = f"{src}.{leaf}"
            if key not in sd:
                raise UserError(f"init_encoder_from={source}: missing key {key!r} of a torchvision ResNet34")
            value = np.asarray(sd[key], np.float32)
            if is_conv:
                if value.ndim != 4:
                    raise UserError(f"init_encoder_from={source}: {key!r} has shape {value.shape}, "
                                    "expected a conv weight [out, in, kh, kw]")
                collection, name, value = "params", "kernel", value.transpose(2, 3, 1, 0)
            else:
                collection, name = _BN[leaf]
            node = tree[collection]
            for part in dst:
                node = node.setdefault(part, {})
            node[name] = value
    _check_shapes(params, source)
    params["stem_conv"]["kernel"], adapted = _adapt_stem(params["stem_conv"]["kernel"], bands, source)
    report = {"init_encoder_from": os.path.abspath(source), "sha256": _sha256(source),
              "format": "torchvision/timm ResNet34 state dict", "into": ENCODER_KEY,
              "loaded": sorted(k for k in sd if not _IGNORED.search(k)),
              "not_used": sorted(k for k in sd if _IGNORED.search(k)), "bands": adapted}
    return params, batch_stats, report


def _check_shapes(params: dict, source: str) -> None:
    """Each conv of ResNet34 has its published shape (catches a file of another width)."""
    widths = (64, *RESNET34_WIDTHS)
    want = {("stem_conv",): (7, 7, None, 64)}
    for s, n_blocks in enumerate(RESNET34_STAGES, start=1):
        out, inp = widths[s], widths[s - 1]
        for b in range(n_blocks):
            block = f"stage{s}_block{b}"
            want[(block, "conv1")] = (3, 3, inp if b == 0 else out, out)
            want[(block, "conv2")] = (3, 3, out, out)
            if b == 0 and s > 1:
                want[(block, "downsample_conv")] = (1, 1, inp, out)
    for path, shape in want.items():
        node = params
        for part in path:
            node = node[part]
        found = node["kernel"].shape
        if any(w is not None and w != f for w, f in zip(shape, found)):
            key = "conv1" if path == ("stem_conv",) else _torch_name(path)
            torch_shape = lambda s: (s[3], s[2], s[0], s[1])  # [kh, kw, in, out] -> [out, in, kh, kw]
            raise UserError(f"init_encoder_from={source}: {key}.weight has shape {torch_shape(found)}, "
                            f"a ResNet34's is {torch_shape(shape)}")


def _torch_name(path: tuple[str, ...]) -> str:
    stage, block = re.match(r"stage(\d+)_block(\d+)", path[0]).groups()
    name = {"downsample_conv": "downsample.0"}.get(path[1], path[1])
    return f"layer{stage}.{block}.{name}"


def _adapt_stem(kernel: np.ndarray, bands: Sequence[str], source: str) -> tuple[np.ndarray, dict]:
    """[7, 7, 3, 64] R,G,B kernel -> [7, 7, len(bands), 64]: R, G, B copied by name, others zero."""
    if kernel.shape[2] != len(FILE_BANDS):
        raise UserError(f"init_encoder_from={source}: conv1.weight has {kernel.shape[2]} input channels, "
                        f"expected {len(FILE_BANDS)} ({', '.join(FILE_BANDS)}, ImageNet order)")
    bands = list(bands)
    missing = [b for b in FILE_BANDS if b not in bands]
    if missing:
        raise UserError(f"init_encoder_from={source}: the dataset's aerial bands {bands} lack {missing}; "
                        f"ImageNet weights need {list(FILE_BANDS)}")
    zero = np.zeros_like(kernel[:, :, 0])
    out = np.stack([kernel[:, :, FILE_BANDS.index(b)] if b in FILE_BANDS else zero for b in bands], axis=2)
    return out, {"copied": [b for b in bands if b in FILE_BANDS],
                 "new_zero": [b for b in bands if b not in FILE_BANDS]}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def warm_start(state, path: str, card: Mapping[str, Any], model_cfg) -> tuple[Any, dict]:
    """`state` with its 'aerial_encoder' params and batch stats replaced by the file's ResNet34,
    each array placed like the one it replaces; the report goes to loaded_weights.json."""
    if ENCODER_KEY not in state.params:
        raise UserError(f"init_encoder_from={path}: this model (variant without an aerial branch) has no "
                        f"{ENCODER_KEY!r} to load a ResNet34 into")
    params, batch_stats, report = resnet34_to_encoder(
        read_state_dict(path), source=path, bands=card["aerial"]["bands"], model_cfg=model_cfg)
    report["new"] = sorted(k for k in state.params if k != ENCODER_KEY)

    def place(have, new, collection):
        if jax.tree.structure(have) != jax.tree.structure(new):
            raise UserError(f"init_encoder_from={path}: the {collection} of {ENCODER_KEY} do not match a "
                            "ResNet34 (model.fused_bn_act or another change of the encoder's layers?)")
        for (where, h), n in zip(jax.tree_util.tree_leaves_with_path(have), jax.tree.leaves(new)):
            if h.shape != n.shape:
                raise UserError(f"init_encoder_from={path}: {ENCODER_KEY}{jax.tree_util.keystr(where)} is "
                                f"{h.shape} in this model, {n.shape} in the file")
        return jax.tree.map(lambda h, n: jax.device_put(n.astype(h.dtype), h.sharding), have, new)

    new_params = {**state.params, ENCODER_KEY: place(state.params[ENCODER_KEY], params, "params")}
    new_stats = {**state.batch_stats,
                 ENCODER_KEY: place(state.batch_stats[ENCODER_KEY], batch_stats, "batch_stats")}
    return state.replace(params=new_params, batch_stats=new_stats), report
