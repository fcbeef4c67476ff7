"""Constants shared by data_prep, the input pipeline, the model and the metrics, and the dataset
card's seal (its checksum over its own content)."""
import hashlib
import json

# The dataset directory written by `python -m data_prep build` (docs/DESIGN.md "dataset_card.json").
CARD_NAME = "dataset_card.json"
PLAN_NAME = "build_plan.json"
SUMMARY_NAME = "build_summary.json"
# Per shard: examples, bytes and sha256, recorded as each shard is renamed into place, so that a
# resumed build verifies the shards of an interrupted one instead of trusting their names.
SHARD_INDEX_NAME = "shard_index.json"
# 2: the card records each shard's byte size and sha256 (splits.<split>.shard_bytes / shard_sha256).
# 3: the card carries CARD_CHECKSUM, the sha256 of the rest of its content: a hand edit is named.
FORMAT_VERSION = 3           # what data_prep writes
FORMAT_VERSIONS = (3,)       # what the pipeline reads; older cards are refused with the way out
CARD_CHECKSUM = "content_sha256"


def zone_key(domain: str, zone: str) -> str:
    """A zone of a domain, as the card lists a split's zones (card["splits"][split]["zones"]) and
    as the build keeps it together in one split: FLAIR #2 reuses zone names (Z1_UU, ...) in every
    department, so the zone name alone would join zones of different departments."""
    return f"{domain}/{zone}" if domain else zone


# Unlabelled pixels, nodata and whole unlabelled patches. Never a class (loss and metrics skip it).
IGNORE_LABEL = 255

# FLAIR #2 (Garioud et al. 2023, "FLAIR #2" challenge): 13 classes after folding codes > 13 into 'other'.
FLAIR2_CLASSES = (
    "building", "pervious surface", "impervious surface", "bare soil", "water", "coniferous",
    "deciduous", "brushwood", "vineyard", "herbaceous vegetation", "agricultural land",
    "plowed land", "other",
)
FLAIR2_AERIAL_BANDS = ("R", "G", "B", "NIR", "elevation")

# Hameln (the seminar's region): 12 classes, names as in the seminar slides.
HAMELN_CLASSES = (
    "buildings", "underground working", "loose material", "grass", "reed", "crop",
    "deciduous trees", "coniferous trees", "grove", "shrubby", "running water", "standing water",
)
HAMELN_AERIAL_BANDS = ("R", "G", "B", "IR")

# Sentinel-2 L2A bands used by FLAIR #2 (10 m and resampled 20 m bands).
S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S2_GSD_M = 10.0


def card_checksum(card: dict) -> str:
    """sha256 of the card's content without its CARD_CHECKSUM field (canonical JSON: sorted keys,
    no spaces), the same for the dict a build writes and the one read back from the file."""
    body = {k: v for k, v in card.items() if k != CARD_CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_card(card: dict) -> dict:
    """The card with its CARD_CHECKSUM set (data_prep build)."""
    return {**card, CARD_CHECKSUM: card_checksum(card)}
