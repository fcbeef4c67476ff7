"""Published weights: a torchvision / timm ResNet34 state dict -> lcssl's U-Net encoder, or a whole
segmentation_models_pytorch U-Net (ResNet34 encoder; IGN's FLAIR baselines) -> lcssl's aerial U-Net.

    state_dict = read_state_dict(path)                     # .safetensors (.pth / .pt / .ckpt with torch)
    params, stats, report = resnet34_to_encoder(state_dict, source=path, ...)
    state, report = warm_start(state, path, card)          # fine-tuning: --config.supervised.init_encoder_from=PATH

torchvision's `resnet34()` and timm's `resnet34` share their key names (conv1, bn1, layer1.0.conv1,
..., layer2.0.downsample.0/1, fc); smp's encoder is the same under 'encoder.', and checkpoints of
DataParallel or Lightning add 'module.' / 'model.': those prefixes are stripped. IGN's FLAIR-1 /
FLAIR-INC training checkpoints (PyTorch Lightning .ckpt files, the smp U-Net under
'model.seg_model.') are read as IGN's own loader reads them: the keys under 'model.seg_model.' are
the model, the task's others (a loss's class weights) are not used. The mapping onto
`lcssl.models.unet.ResNetEncoder` (the 'aerial_encoder' subtree):

    conv1.weight [O, I, kh, kw]          -> stem_conv/kernel [kh, kw, I, O]
    bn1.weight, .bias                    -> stem_bn/scale, bias             (params)
    bn1.running_mean, .running_var       -> stem_bn/mean, var               (batch_stats)
    layer{s}.{b}.conv1/bn1/conv2/bn2     -> stage{s}_block{b}/conv1/bn1/conv2/bn2
    layer{s}.{b}.downsample.0 / .1       -> stage{s}_block{b}/downsample_conv / downsample_bn
    fc.*, num_batches_tracked            -> not used (the ImageNet classifier, a counter)

The two compute the same function: same paddings (7x7/2 pad 3, 3x3 pad 1, max-pool 3x3/2 pad 1 with
-inf padding), batch norm eps 1e-5 on both sides (tests/test_pretrained.py checks the features).

smp `Unet('resnet34')` (IGN's FLAIR-1 / FLAIR-INC baselines: 5-band RGBIE stems) adds, mapped onto
'aerial_decoder' (lcssl.models.unet.UNetDecoder) and 'seg_head':

    encoder.*                                 -> the ResNet34 mapping above
    decoder.blocks.{i}.conv{j}.0.weight       -> block{i}/conv{j}/kernel          (i 0..4, j 1..2)
    decoder.blocks.{i}.conv{j}.1.*            -> block{i}/bn{j}/scale, bias, mean, var
    segmentation_head.0.weight, .bias         -> seg_head/kernel, bias  (when its class count is the card's)

The same function (smp's DecoderBlock: nearest upsample x2, concatenate [x, skip], conv3x3-BN-ReLU
twice, no attention, center Identity; head conv3x3 with bias) for model.variant='unet'; the U-T&T
variant fuses the Sentinel-2 features into the levels before the decoder. Decoder channels must be
smp's (256, 128, 64, 32, 16); an attention or other decoder key is refused by name.

Bands: an ImageNet stem sees R, G, B; a 4-channel stem R, G, B, NIR (RGBI); a 5-channel stem FLAIR's
R, G, B, NIR, elevation (RGBIE, IGN's channel order). IR and NIR are the same band. The dataset's bands are matched by name (any order); a band
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
import pickle
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from lcssl.errors import UserError

# ResNet34 (He et al. 2016, table 1): BasicBlocks per stage and widths; stem 64.
RESNET34_STAGES = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)
# A file's stem bands by its input channels: torchvision / timm ImageNet R, G, B; RGBI; FLAIR's RGBIE.
FILE_BANDS = ("R", "G", "B")
FILE_BANDS_BY_CHANNELS = {3: FILE_BANDS, 4: ("R", "G", "B", "NIR"), 5: ("R", "G", "B", "NIR", "elevation")}
_ALIASES = {"IR": "NIR"}  # Hameln's name for the near infrared
SMP_DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp Unet's default decoder_channels
DECODER_KEY, HEAD_KEY = "aerial_decoder", "seg_head"
ENCODER_KEY = "aerial_encoder"  # the top-level param subtree the weights go to (lcssl.models.utt)
_FIELD = "supervised.init_encoder_from"  # the config field a message names
# Wrappers around a model's keys, stripped where every key has them, in this order: DataParallel's,
# a Lightning task's attribute, IGN's FLAIR task's smp model, a backbone's.
_PREFIXES = ("module.", "model.", "seg_model.", "encoder.", "backbone.")
_IGN_TASK = "model.seg_model."  # IGN's FLAIR-1 / FLAIR-INC checkpoints: the smp U-Net's keys under it
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")
_IGNORED = re.compile(r"^fc\.|num_batches_tracked$")
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{key: array} of a .safetensors file, or where torch is installed of a .pth / .pt file or a
    PyTorch Lightning .ckpt (its 'state_dict'). torch files are read with weights_only=True: tensors
    and plain containers, never other pickled objects."""
    if not os.path.isfile(path):
        raise UserError(f"{_FIELD}={path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{_FIELD}={path}: not a readable .safetensors file ({e})") from None
    if path.endswith(_TORCH_SUFFIXES):
        try:
            import torch
        except ImportError:
            raise UserError(f"{_FIELD}={path}: reading a {os.path.splitext(path)[1]} file needs torch, which "
                            "is not installed; convert it once where torch is (safetensors.torch.save_file("
                            "torch.load(path), 'weights.safetensors')) and pass the .safetensors file") from None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad file
            if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
                raise UserError(f"{_FIELD}={path}: the file holds Python objects besides tensors, which lcssl "
                                "does not unpickle (torch.load(weights_only=True)); where you trust the file, "
                                "save its weights once: torch.save(torch.load(path, weights_only=False)"
                                "['state_dict'], 'weights.pth')") from None
            first = (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"{_FIELD}={path}: torch cannot read it ({type(e).__name__}: {first})") from None
        loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(loaded, Mapping):
            raise UserError(f"{_FIELD}={path}: expected a state dict, found {type(loaded).__name__}")
        return {k: v.detach().cpu().numpy() for k, v in loaded.items() if hasattr(v, "detach")}
    raise UserError(f"{_FIELD}={path}: expected a .safetensors file (or .pth / .pt / .ckpt with torch installed)")


def _unwrap(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the model's keys without their wrapper prefixes, the file's keys that are not the model's:
    those beside 'model.seg_model.' in an IGN checkpoint)."""
    out = dict(state_dict)
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    outside = []
    if any(k.startswith(_IGN_TASK) for k in out):  # as IGN's loader: the model is what is under it
        outside = sorted(k for k in out if not k.startswith(_IGN_TASK))
        out = {k: v for k, v in out.items() if k.startswith(_IGN_TASK)}
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out, outside


def _looks_like(keys: Sequence[str]) -> str:
    """What a file the ResNet34 reader cannot map is, from its keys (for the error's hint)."""
    smp = next((k for k in keys if "decoder.blocks." in k), None)
    if smp is not None:
        prefix = smp[:smp.index("decoder.blocks.")]
        if not prefix:
            return ("an smp U-Net: this reader takes its encoder only (warm_start loads the whole U-Net "
                    "into the aerial U-Net)")
        return (f"an smp U-Net under the prefix {prefix!r}, which lcssl does not strip (it strips "
                f"{', '.join(map(repr, (_IGN_TASK, *_PREFIXES)))}); save its state dict without it")
    if any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in keys):
        return "a bottleneck ResNet (ResNet50/101/152: conv3 in every block), not a ResNet34"
    tops = sorted({k.split(".")[0] for k in keys})
    return ("neither a torchvision/timm ResNet34 nor an smp U-Net: its keys start with "
            f"{', '.join(repr(t + '.') for t in tops[:6])}{' ...' if len(tops) > 6 else ''}")


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
            raise UserError(f"{_FIELD}={source}: a ResNet34 needs model.stage_sizes={RESNET34_STAGES}, "
                            f"model.widths={RESNET34_WIDTHS}, model.stem_width=64; this model has {have}")
    sd, outside = _unwrap(state_dict)
    mapping = _expected_keys(RESNET34_STAGES)
    for key in sorted(sd):
        module, _, _ = key.rpartition(".")
        if module not in mapping and not _IGNORED.search(key):
            raise UserError(f"{_FIELD}={source}: unexpected key {key!r}: the file looks like "
                            f"{_looks_like(list(sd))}")
    params: dict = {}
    batch_stats: dict = {}
    tree = {"params": params, "batch_stats": batch_stats}
    for src, dst in mapping.items():
        is_conv = "conv" in dst[-1]
        for leaf in (("weight",) if is_conv else tuple(_BN)):
            key = f"{src}.{leaf}"
            if key not in sd:
                block = ".".join(src.split(".")[:2])  # layer{s}.{b}
                fewer = (f" (the file has no block {block}: a ResNet18, 2 blocks per stage?)"
                         if src.startswith("layer") and not any(k.startswith(f"{block}.") for k in sd) else "")
                raise UserError(f"{_FIELD}={source}: missing key {key!r} of a torchvision ResNet34{fewer}")
            value = np.asarray(sd[key], np.float32)
            if is_conv:
                if value.ndim != 4:
                    raise UserError(f"{_FIELD}={source}: {key!r} has shape {value.shape}, "
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
              "not_used": sorted([*(k for k in sd if _IGNORED.search(k)), *outside]), "bands": adapted}
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
            raise UserError(f"{_FIELD}={source}: {key}.weight has shape {torch_shape(found)}, "
                            f"a ResNet34's is {torch_shape(shape)}")


def _torch_name(path: tuple[str, ...]) -> str:
    stage, block = re.match(r"stage(\d+)_block(\d+)", path[0]).groups()
    name = {"downsample_conv": "downsample.0"}.get(path[1], path[1])
    return f"layer{stage}.{block}.{name}"


def _adapt_stem(kernel: np.ndarray, bands: Sequence[str], source: str) -> tuple[np.ndarray, dict]:
    """[7, 7, I, 64] kernel of the file's bands (FILE_BANDS_BY_CHANNELS[I]) -> [7, 7, len(bands), 64]:
    bands copied by name, the dataset's others zero, the file's others dropped (reported)."""
    file_bands = FILE_BANDS_BY_CHANNELS.get(kernel.shape[2])
    if file_bands is None:
        raise UserError(f"{_FIELD}={source}: conv1.weight has {kernel.shape[2]} input channels, "
                        "expected 3 (R, G, B, ImageNet order), 4 (R, G, B, NIR) or 5 (FLAIR's R, G, B, NIR, "
                        "elevation)")
    bands = list(bands)
    names = [_ALIASES.get(b, b) for b in bands]
    missing = [b for b in FILE_BANDS if b not in names]
    if missing:
        raise UserError(f"{_FIELD}={source}: the dataset's aerial bands {bands} lack {missing}; "
                        f"these weights need {list(FILE_BANDS)}")
    zero = np.zeros_like(kernel[:, :, 0])
    out = np.stack([kernel[:, :, file_bands.index(n)] if n in file_bands else zero for n in names], axis=2)
    return out, {"copied": [b for b, n in zip(bands, names) if n in file_bands],
                 "new_zero": [b for b, n in zip(bands, names) if n not in file_bands],
                 **({"dropped": [f for f in file_bands if f not in names]} if kernel.shape[2] != 3 else {})}


def is_smp_unet(state_dict: Mapping[str, np.ndarray]) -> bool:
    """A segmentation_models_pytorch U-Net state dict (its decoder blocks are there), bare or in a
    wrapper lcssl strips (IGN's 'model.seg_model.', 'module.', 'model.', 'seg_model.')."""
    return any(k.startswith("decoder.blocks.") for k in _unwrap(state_dict)[0])


def smp_unet_to_aerial(state_dict: Mapping[str, np.ndarray], *, source: str, bands: Sequence[str],
                       num_classes: int, model_cfg: Mapping[str, Any] | None = None) -> tuple[dict, dict, dict]:
    """({'aerial_encoder', 'aerial_decoder'[, 'seg_head']} params, batch_stats, report) of an smp
    Unet('resnet34') state dict. The head is loaded when it has `num_classes` outputs, else left new
    (reported). UserError names `source` and the first key or shape that does not map."""
    if model_cfg is not None and tuple(model_cfg["decoder_channels"]) != SMP_DECODER_CHANNELS:
        raise UserError(f"{_FIELD}={source}: an smp U-Net's decoder needs model.decoder_channels="
                        f"{SMP_DECODER_CHANNELS}; this model has {tuple(model_cfg['decoder_channels'])}")
    sd, outside = _unwrap(state_dict)
    encoder = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    enc_params, enc_stats, enc_report = resnet34_to_encoder(encoder, source=source, bands=bands,
                                                            model_cfg=model_cfg)
    dec_params: dict = {}
    dec_stats: dict = {}
    used: set = set()
    for i, width in enumerate(SMP_DECODER_CHANNELS):
        block_p, block_s = dec_params.setdefault(f"block{i}", {}), dec_stats.setdefault(f"block{i}", {})
        for j in (1, 2):
            conv, bn = f"decoder.blocks.{i}.conv{j}.0", f"decoder.blocks.{i}.conv{j}.1"
            for key in (f"{conv}.weight", *(f"{bn}.{leaf}" for leaf in _BN)):
                if key not in sd:
                    raise UserError(f"{_FIELD}={source}: missing key {key!r} of an smp Unet('resnet34') "
                                    "decoder (decoder_use_batchnorm=True)")
            kernel = np.asarray(sd[f"{conv}.weight"], np.float32)
            if kernel.ndim != 4 or kernel.shape[0] != width or kernel.shape[2:] != (3, 3):
                raise UserError(f"{_FIELD}={source}: {conv}.weight has shape {kernel.shape}, expected "
                                f"({width}, in, 3, 3) (decoder_channels {SMP_DECODER_CHANNELS})")
            block_p[f"conv{j}"] = {"kernel": kernel.transpose(2, 3, 1, 0)}
            block_p[f"bn{j}"] = {"scale": np.asarray(sd[f"{bn}.weight"], np.float32),
                                 "bias": np.asarray(sd[f"{bn}.bias"], np.float32)}
            block_s[f"bn{j}"] = {"mean": np.asarray(sd[f"{bn}.running_mean"], np.float32),
                                 "var": np.asarray(sd[f"{bn}.running_var"], np.float32)}
            used |= {f"{conv}.weight", *(f"{bn}.{leaf}" for leaf in (*_BN, "num_batches_tracked"))}
    params = {ENCODER_KEY: enc_params, DECODER_KEY: dec_params}
    stats = {ENCODER_KEY: enc_stats, DECODER_KEY: dec_stats}
    head_w, head_b = sd.get("segmentation_head.0.weight"), sd.get("segmentation_head.0.bias")
    report = {**enc_report, "format": "segmentation_models_pytorch Unet('resnet34') state dict",
              "into": [ENCODER_KEY, DECODER_KEY],
              "not_used": sorted([*(f"encoder.{k}" for k in enc_report["not_used"]), *outside])}
    if head_w is not None and head_b is not None:
        used |= {"segmentation_head.0.weight", "segmentation_head.0.bias"}
        head_w = np.asarray(head_w, np.float32)
        if head_w.shape[1:] != (SMP_DECODER_CHANNELS[-1], 3, 3):
            raise UserError(f"{_FIELD}={source}: segmentation_head.0.weight has shape {head_w.shape}, "
                            f"expected (classes, {SMP_DECODER_CHANNELS[-1]}, 3, 3)")
        if head_w.shape[0] == num_classes:
            params[HEAD_KEY] = {"kernel": head_w.transpose(2, 3, 1, 0), "bias": np.asarray(head_b, np.float32)}
            report["into"].append(HEAD_KEY)
        else:
            report["head_not_loaded"] = (f"segmentation_head has {head_w.shape[0]} classes, the dataset card "
                                         f"{num_classes}: {HEAD_KEY} starts new")
    other = sorted(k for k in sd if k not in used and not k.startswith("encoder."))
    if other:
        raise UserError(f"{_FIELD}={source}: unexpected key {other[0]!r} of an smp U-Net: lcssl's "
                        "decoder has no attention (decoder_attention_type=None) and no center block")
    report["loaded"] = sorted([*(f"encoder.{k}" for k in enc_report["loaded"]),
                               *(k for k in used if k in sd and not k.endswith("num_batches_tracked")
                                 and (HEAD_KEY in params or not k.startswith("segmentation_head")))])
    return params, stats, report


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
        raise UserError(f"{_FIELD}={path}: this model (variant without an aerial branch) has no "
                        f"{ENCODER_KEY!r} to load a ResNet34 into")
    state_dict = read_state_dict(path)
    if is_smp_unet(state_dict):
        params, batch_stats, report = smp_unet_to_aerial(state_dict, source=path, bands=card["aerial"]["bands"],
                                                         num_classes=len(card["classes"]), model_cfg=model_cfg)
    else:
        encoder_params, encoder_stats, report = resnet34_to_encoder(
            state_dict, source=path, bands=card["aerial"]["bands"], model_cfg=model_cfg)
        params, batch_stats = {ENCODER_KEY: encoder_params}, {ENCODER_KEY: encoder_stats}
    report["new"] = sorted(k for k in state.params if k not in params)

    def place(key, have, new, collection):
        if jax.tree.structure(have) != jax.tree.structure(new):
            raise UserError(f"{_FIELD}={path}: the {collection} of {key} do not match the file's "
                            "(model.fused_bn_act or another change of the layers?)")
        for (where, h), n in zip(jax.tree_util.tree_leaves_with_path(have), jax.tree.leaves(new)):
            if h.shape != n.shape:
                raise UserError(f"{_FIELD}={path}: {key}{jax.tree_util.keystr(where)} is "
                                f"{h.shape} in this model, {n.shape} in the file")
        return jax.tree.map(lambda h, n: jax.device_put(n.astype(h.dtype), h.sharding), have, new)

    for key in params:
        if key not in state.params:
            raise UserError(f"{_FIELD}={path}: this model has no {key!r} for the file's weights")
    new_params = {**state.params, **{k: place(k, state.params[k], v, "params") for k, v in params.items()}}
    new_stats = {**state.batch_stats, **{k: place(k, state.batch_stats[k], v, "batch_stats")
                                         for k, v in batch_stats.items()}}
    return state.replace(params=new_params, batch_stats=new_stats), report
