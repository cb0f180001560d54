"""The label store: relabel's output, the student's input (DESIGN 2.3, 3).

- :mod:`~lpqld_fast.store.layout`: on-disk schema (components, dtypes, slot encoding)
- :mod:`~lpqld_fast.store.quantize`: soft-label encoders / decoders (dense, MR-k, MRS-k, MS-k, top-k; fp16/int8)
- :mod:`~lpqld_fast.store.manifest`: the manifest relabel records (settings, sources, random-stream rules)
- :mod:`~lpqld_fast.store.writer`: preallocated, resumable, multi-writer-safe writes
- :mod:`~lpqld_fast.store.reader`: verified open, per-batch records from memory maps
- :mod:`~lpqld_fast.store.accounting`: bytes per component and the ratio to full labels
"""
from lpqld_fast.store.accounting import (  # noqa: F401
    StorageReport,
    StorageRow,
    full_label_bytes,
    storage_markdown,
    storage_report,
)
from lpqld_fast.store.layout import FORMAT, MANIFEST, SCHEMA_VERSION, component_specs  # noqa: F401
from lpqld_fast.store.manifest import label_store_manifest  # noqa: F401
from lpqld_fast.store.quantize import (  # noqa: F401
    MODES,
    VALUE_DTYPES,
    EncodedLabels,
    SoftLabels,
    decode_labels,
    dequantize_int8,
    encode_labels,
    index_dtype_for,
    quantize_int8,
)
from lpqld_fast.store.reader import BatchRecord, LabelStore  # noqa: F401
from lpqld_fast.store.writer import StoreWriter  # noqa: F401
