"""Asymmetric Feature Fusion (AFF): several frozen gallery features fused by a dynamic mixer in the cloud,
one light query model on the phone, trained into the same embedding space with a momentum classifier.

Modules: config (typed config + file loading), features (memory-mapped feature caches), mixer (dynamic
mixer and baselines), query (query model, momentum classifier), gallery (the saved gallery side),
train (the pipeline behind `retrieval-sdk train aff`). Import them directly; this package file stays
light so that importing one does not pull in the others.
"""
