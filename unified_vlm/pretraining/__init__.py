"""Jobs that train one part apart from the unified model, each a ``python -m unified_vlm`` command:
``train-vq`` (vq), ``pretrain-encoder`` (encoder), ``pretrain-contrastive`` (contrastive),
``train-feature-decoder`` (feature_decoder), ``train-reader`` (reader, the evaluation's watch
reader) and ``build-assets`` (build_assets, which also trains a missing built-in weight into the
cache). They import ``unified_vlm.models``, never the other way round; ``common`` holds the
scaffolding they share.
"""
