"""Feature cache: reused when nothing changed, rebuilt when the encoder, resolution or data changed."""

from __future__ import annotations

import torch
from test_eval_features import TinyEncoder, tiny_dataset  # noqa: E402  (same test folder)

from sslkit.eval.features import cached_features, encoder_hash


def test_cache_reused_then_invalidated(tmp_path):
    enc, ds = TinyEncoder(), tiny_dataset(n=10)
    first = cached_features(enc, ds, image_size=12, cache_dir=tmp_path, batch_size=4, progress=False)
    assert enc.calls == 3 and not first.from_cache
    assert len(list(tmp_path.glob("feats-*.pt"))) == 1

    again = cached_features(enc, ds, image_size=12, cache_dir=tmp_path, batch_size=4, progress=False)
    assert enc.calls == 3 and again.from_cache  # no forward pass
    assert torch.equal(again.features, first.features) and torch.equal(again.labels, first.labels)

    with torch.no_grad():
        enc.net[0].weight.add_(0.1)  # "another checkpoint"
    changed = cached_features(enc, ds, image_size=12, cache_dir=tmp_path, batch_size=4, progress=False)
    assert enc.calls == 6 and not changed.from_cache
    assert not torch.equal(changed.features, first.features)
    assert changed.key.encoder_hash != first.key.encoder_hash

    cached_features(enc, ds, image_size=16, cache_dir=tmp_path, batch_size=4, progress=False)  # other resolution
    assert enc.calls == 9
    cached_features(enc, tiny_dataset(n=9), image_size=16, cache_dir=tmp_path, batch_size=4, progress=False)
    assert enc.calls == 12


def test_no_cache_dir_always_extracts(tmp_path):
    enc, ds = TinyEncoder(), tiny_dataset(n=4)
    for _ in range(2):
        cached_features(enc, ds, image_size=12, cache_dir=None, batch_size=4, progress=False)
    assert enc.calls == 2


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    enc, ds = TinyEncoder(), tiny_dataset(n=4)
    fs = cached_features(enc, ds, image_size=12, cache_dir=tmp_path, batch_size=4, progress=False)
    fs.path.write_bytes(b"not a torch file")
    again = cached_features(enc, ds, image_size=12, cache_dir=tmp_path, batch_size=4, progress=False)
    assert not again.from_cache and enc.calls == 2
    assert cached_features(enc, ds, image_size=12, cache_dir=tmp_path, progress=False).from_cache


def test_encoder_hash_tracks_weights_and_buffers():
    a, b = TinyEncoder(), TinyEncoder()
    assert encoder_hash(a) == encoder_hash(b)
    b.net[1].running_mean.add_(1.0)
    assert encoder_hash(a) != encoder_hash(b)


def test_precision_is_part_of_the_key(tmp_path):
    enc, ds = TinyEncoder(), tiny_dataset(n=4)
    fp32 = cached_features(enc, ds, image_size=12, cache_dir=tmp_path, progress=False)
    bf16 = cached_features(enc, ds, image_size=12, cache_dir=tmp_path, progress=False, bf16=True)
    assert not bf16.from_cache and fp32.path != bf16.path and enc.calls == 2
