"""RefCOCO-family data: REFER files (refer), the embedded generated dataset (synthetic), the TFDS
builder with masks (tfds_builder), build-once preparation (prepare) and the grain input pipeline
(pipeline). Import the submodule you need; this package imports nothing heavy."""
