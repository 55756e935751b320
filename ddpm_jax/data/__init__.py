"""Random-access image data sources behind `ddpm_jax.input_pipeline`.

Every source here returns, for an integer index, a dict
``{'image': uint8 [S, S, C], 'label': int32 []}`` already resized and
centre-cropped to the configured image size ``S``, and has a ``repr`` that is
stable across runs (grain stores it with the iterator state and checks it on
restore).
"""
