"""Merging several adapters: dense task vectors (`task_vectors`), their combinations (`combine`: task
arithmetic, TIES, DARE) and the way back to a low-rank adapter (`low_rank`: truncated SVD, ``cat``).

docs/METHODS.md, "Merging several adapters". The command line and the study call these; nothing here reads
run directories.
"""
