"""Merging several adapters: dense task vectors (`task_vectors`), their combinations (`combine`: task
arithmetic, TIES, DARE) and the way back to a low-rank adapter (`low_rank`: truncated SVD, ``cat``).

docs/METHODS.md, "Merging several adapters". `runs` turns saved run directories into merge inputs (one base,
checked by fingerprint); `study` and `study_report` are the merging study (conf/experiment/merging.yaml).
"""
