"""Losses as pure functions of tensors: one loss per file, with the paper, the shapes and an example in each
docstring. They hold no model and no state; objectives compose them with encoders and heads.

Under ``torch.distributed`` the losses whose statistics or negatives span the batch gather it across ranks
(:mod:`sslkit.losses.distributed`), so that DDP computes what one process computes on the whole batch.
"""
