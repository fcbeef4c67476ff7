"""lcssl's encoder against real torchvision: the same random ResNet34, the same input, the features.

torch is not a dependency of lcssl, so this runs in two interpreters:

    # 1. where torch + torchvision + safetensors are installed (e.g. a separate venv):
    /path/to/torchvenv/bin/python bench/torchvision_resnet34_check.py export --out=/tmp/tv34
    # 2. in lcssl's venv:
    python bench/torchvision_resnet34_check.py compare --out=/tmp/tv34

`export` writes resnet34.safetensors (torchvision.models.resnet34(), random init, random batch-norm
running statistics so eval mode is not the identity), input.npy [2, 3, 64, 64] and features.npz
(relu(bn1(conv1)), layer1..layer4, eval mode, float32). `compare` loads the file through
lcssl.pretrained into lcssl's ResNetEncoder (float32) and prints, per level, the largest absolute
difference relative to the level's largest magnitude, as one JSON line.
"""
import argparse
import json
import os
import sys


def export(out: str) -> None:
    import numpy as np
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        feats = [h]
        h = model.maxpool(h)
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            h = layer(h)
            feats.append(h)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "resnet34.safetensors"))
    np.save(os.path.join(out, "input.npy"), x.numpy())
    np.savez(os.path.join(out, "features.npz"), *[f.numpy() for f in feats])
    print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__}))


def compare(out: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lcssl import pretrained
    from lcssl.models.unet import ResNetEncoder

    path = os.path.join(out, "resnet34.safetensors")
    params, stats, report = pretrained.resnet34_to_encoder(pretrained.read_state_dict(path), source=path,
                                                           bands=["R", "G", "B"])
    x = np.load(os.path.join(out, "input.npy"))
    levels = ResNetEncoder().apply({"params": params, "batch_stats": stats}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    want = np.load(os.path.join(out, "features.npz"))
    rel = []
    for i, got in enumerate(levels):
        w = want[f"arr_{i}"].transpose(0, 2, 3, 1).astype(np.float64)
        assert got.shape == w.shape, (i, got.shape, w.shape)
        rel.append(float(np.abs(np.asarray(got, np.float64) - w).max() / np.abs(w).max()))
    print(json.dumps({"jax": jax.__version__, "loaded_arrays": len(report["loaded"]),
                      "max_abs_diff_over_max_abs_per_level": rel}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("export", "compare"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    export(args.out) if args.mode == "export" else compare(args.out)
