"""The canonical Arrow schemas every stage reads and writes.

Ids are strings everywhere (whatever the source used), timestamps int64 seconds (with
``data.timestamp_unit: auto``, integer timestamps in the input's own unit, one per file:
`rosepo.data.readers.TimestampUnit`).
"""

from __future__ import annotations

import pyarrow as pa

#: One user-item event.
INTERACTIONS = pa.schema([
    ("user_id", pa.string()),
    ("item_id", pa.string()),
    ("timestamp", pa.int64()),
])

#: One item of the catalog, its title already normalised.
CATALOG = pa.schema([
    ("item_id", pa.string()),
    ("title", pa.string()),
])

#: One recommendation sample: a history window, 20 candidates, the true next item.
SAMPLES = pa.schema([
    ("sample_id", pa.string()),            # f"{user_id}:{position of the target in the user's sequence}"
    ("user_id", pa.string()),
    ("split", pa.string()),                # train / valid / test (user-level)
    ("history_item_ids", pa.list_(pa.string())),   # oldest first, at most max_history
    ("history_titles", pa.list_(pa.string())),
    ("target_item_id", pa.string()),
    ("target_title", pa.string()),
    ("candidate_item_ids", pa.list_(pa.string())),  # shuffled, the target among them
    ("candidate_titles", pa.list_(pa.string())),
    ("template_id", pa.int32()),
    ("prompt", pa.string()),
    ("answer", pa.string()),               # == target_title
])

#: Separator of history titles in the LLaRA / S-DPO JSON format; titles may not contain it.
HISTORY_SEP = "::"

#: One preference pair (`rosepo.pairs.build`): a sample's prompt, the chosen answer (the target) and
#: K rejected candidates, with the oracle's and the SFT model's (reference) scores of each and the
#: token ids the alignment trainer feeds.
PAIRS = pa.schema([
    ("pair_id", pa.string()),
    ("sample_id", pa.string()),
    ("user_id", pa.string()),
    ("split", pa.string()),
    ("strategy", pa.string()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.list_(pa.string())),
    ("chosen_index", pa.int32()),
    ("rejected_index", pa.list_(pa.int32())),
    ("candidate_titles", pa.list_(pa.string())),
    ("oracle_chosen", pa.float64()),
    ("oracle_rejected", pa.list_(pa.float64())),
    ("ref_chosen_logp", pa.float64()),
    ("ref_rejected_logp", pa.list_(pa.float64())),
    ("prompt_ids", pa.list_(pa.int32())),
    ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.list_(pa.int32()))),
    # The user consumes a rejected item later in their own sequence (null: the sample's id holds no
    # position); chosen and rejected were swapped on purpose (``pairs.label_noise``).
    ("false_negative", pa.bool_()),
    ("flipped", pa.bool_()),
])
