"""Land-cover maps from a trained model: sliding-window prediction over a GeoTIFF mosaic, or
per-patch maps of a prepared split.

    python -m lcssl.predict --checkpoint=runs/ft --aerial=MOSAIC.tif --sits=S2_DIR --out=MAP.tif
    python -m lcssl.predict --checkpoint=runs/ft --records=data/flair2 --split=test --out=MAPS_DIR

Split by what changes together (docs/DESIGN.md, "Prediction"):
    windows.py   window planning and blending weights (pure)
    sits.py      Sentinel-2 dates, each window's crop read through its footprint, the training
                 preprocessing of that crop
    blend.py     the blender (pure): (window, logits) -> finished rows
    sinks.py     outputs behind one interface: class map, confidence, probabilities, the
                 aerial-only flag, per-patch maps (a new format = one sink class)
    model.py     a run's weights as a forward function (through lcssl.checkpoint), its aerial-only
                 path, test-time augmentation, the device step
    inputs.py    opening rasters, matching bands to the checkpoint's
    mosaic.py    predict_mosaic;  split.py: predict_split;  __main__.py: the command line

No TensorFlow here (the GPU machines have none) except inside predict_split.
"""
from lcssl.predict.model import load_model
from lcssl.predict.mosaic import DEFAULT_BLOCK_WIDTH, predict_mosaic
from lcssl.predict.sinks import NODATA, PROB_SCALE, class_colours, qml_style
from lcssl.predict.sits import find_sits, sits_options, window_series
from lcssl.predict.split import predict_split

__all__ = ["DEFAULT_BLOCK_WIDTH", "NODATA", "PROB_SCALE", "class_colours", "find_sits",
           "load_model", "predict_mosaic", "predict_split", "qml_style", "sits_options",
           "window_series"]
