"""Streaming shards: packing, the node/rank/worker split, exact resume, and training on them."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, get_worker_info

from sslkit.cli import main
from sslkit.config import resolve
from sslkit.data import DataError, TensorImageDataset
from sslkit.data.image_folder import decode_image
from sslkit.data.loader import ResumableBatchSampler, ViewDataset
from sslkit.data.shards import ShardDataset, pack
from sslkit.engine import load_checkpoint, train
from sslkit.registry import DATASETS


def _image_bytes(seed: int, fmt: str, size: int = 12) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size + seed % 3, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """Two classes of PNG and JPEG files, plus two unreadable files."""
    root = tmp_path / "images"
    files = {}
    for c, cls in enumerate(["cat", "dog"]):
        (root / cls).mkdir(parents=True)
        for k in range(5):
            ext, fmt = ("png", "PNG") if k % 2 else ("jpg", "JPEG")
            p = root / cls / f"{k}.{ext}"
            p.write_bytes(_image_bytes(10 * c + k, fmt))
            files[p] = c
    bad = [root / "cat" / "broken.jpg", root / "dog" / "truncated.png"]
    bad[0].write_bytes(b"not an image at all")
    bad[1].write_bytes(_image_bytes(99, "PNG")[:60])
    return root, files, bad


def test_pack_round_trip_and_unreadable_files(folder, tmp_path, capsys):
    import webdataset as wds

    root, files, bad = folder
    out = tmp_path / "shards"
    assert main(["data", "pack", str(root), str(out), "--shard-size", "3", "--shuffle-seed", "7"]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out[:printed.out.index("\n}") + 2])
    assert sorted(summary["skipped"]) == sorted(str(p) for p in bad)
    for p in bad:
        assert f"skipped unreadable: {p}" in printed.out
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["cat", "dog"] and index["num_samples"] == 10
    assert [s["count"] for s in index["shards"]] == [3, 3, 3, 1]

    # A reference reader (webdataset itself) sees every readable file's own bytes with its class.
    by_bytes = {p.read_bytes(): c for p, c in files.items()}
    urls = [str(out / s["name"]) for s in index["shards"]]
    seen = [(s.get("png", s.get("jpg")), int(s["cls"])) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(seen) == sorted(by_bytes.items())

    # The shards dataset decodes the same images, in pack order, with the labels of the index.
    ds = DATASETS.build("shards", split="train", root=str(out))
    assert len(ds) == 10 and ds.classes == ["cat", "dog"]
    assert ds.labels.tolist() == [c for _, c in seen]
    for i, (data, c) in enumerate(seen):
        image, label = ds[i]
        assert label == c
        assert torch.equal(image, decode_image(io.BytesIO(data)))

    # Packing into a folder that already holds shards is refused with the fix.
    assert main(["data", "pack", str(root), str(out)]) == 2
    assert "already holds packed shards" in capsys.readouterr().err


def test_damaged_shard_and_index_are_reported(folder, tmp_path):
    root, _, _ = folder
    out = tmp_path / "shards"
    pack(DATASETS.build("image_folder", root=str(root)), out, shard_size=4, progress=False)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["name"] = "../../etc/passwd.tar"
    (tmp_path / "evil.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="plain file name"):
        ShardDataset(tmp_path / "evil.json")
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[:1500])
    ds = ShardDataset(out / "index.json")
    with pytest.raises(DataError, match="shard-000001.tar"):
        ds[5]


class _Tagged(Dataset):
    """Item -> (sample id encoded in the image, the DataLoader worker that read it)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, _ = self.ds[i]
        info = get_worker_info()
        return int(image[0, 0, 0]) * 256 + int(image[0, 0, 1]), -1 if info is None else info.id


def _id_dataset(n: int) -> TensorImageDataset:
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = torch.arange(n) // 256, torch.arange(n) % 256
    return TensorImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"], "ids")


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("ids") / "shards"
    pack(_id_dataset(100), out, shard_size=9, shuffle_seed=3, progress=False)  # 12 shards, the last of 1
    return ShardDataset(out / "index.json", shuffle_window=3)


def _rank_stream(ds, rank, world, workers, epoch, start_batch=0, batch=4, seed=5):
    sampler = ResumableBatchSampler(len(ds), batch, seed, rank, world, order=ds.epoch_order)
    sampler.set_epoch(epoch, start_batch)
    loader = DataLoader(ViewDataset(_Tagged(ds), None), batch_sampler=sampler, num_workers=workers)
    ids, who = [], []
    for sample_ids, worker in loader:
        ids.append(sample_ids.tolist())
        who.append(set(worker.tolist()))
    return ids, who


def test_two_ranks_two_workers_read_each_sample_once(id_shards):
    ds = id_shards
    for epoch in (0, 1):
        streams = [_rank_stream(ds, r, 2, 2, epoch) for r in range(2)]
        ids = [i for batches, _ in streams for b in batches for i in b]
        # 100 samples, global batch 8: 12 steps per epoch; the 4-sample tail is dropped, nothing else.
        assert len(ids) == len(set(ids)) == 96
        sample_id = [_Tagged(ds)[k][0] for k in range(len(ds))]  # pack shuffled the samples: position -> id
        assert sorted(sample_id) == list(range(100))
        order = [sample_id[k] for k in ds.epoch_order(torch.Generator().manual_seed(5 * 1_000_003 + epoch))]
        assert sorted(ids) == sorted(order[:96]) and set(order[96:]).isdisjoint(ids)
        # Rank r holds the r-th 4-sample slice of each 8-sample global batch; batch k came from worker k mod 2.
        for r, (batches, who) in enumerate(streams):
            assert batches == [order[8 * k + 4 * r: 8 * k + 4 * r + 4] for k in range(12)]
            assert who == [{k % 2} for k in range(12)]
        # Workers change who reads, not what is read.
        assert _rank_stream(ds, 0, 2, 0, epoch)[0] == streams[0][0]


def test_epoch_order_streams_shard_by_shard(id_shards):
    ds = id_shards
    a = ds.epoch_order(torch.Generator().manual_seed(1))
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, ds.epoch_order(torch.Generator().manual_seed(2)))
    shard_of = [ds.locate(i)[0] for i in a.tolist()]
    # The order visits windows of 3 shards: a window's samples are contiguous, and mixed across its shards.
    first = sorted(range(12), key=shard_of.index)
    start = 0
    for w in range(4):
        window = set(first[3 * w: 3 * w + 3])
        positions = [p for p, s in enumerate(shard_of) if s in window]
        assert positions == list(range(start, start + len(positions)))
        assert len(set(shard_of[start:start + 6])) > 1  # shuffled inside the window, not shard after shard
        start += len(positions)
    assert start == 100


def test_resume_mid_epoch_continues_at_the_exact_sample(id_shards):
    ds = id_shards
    for r in range(2):
        full, _ = _rank_stream(ds, r, 2, 2, epoch=1)
        resumed, who = _rank_stream(ds, r, 2, 2, epoch=1, start_batch=5)
        assert resumed == full[5:]
        assert who[0] == {0}  # the resumed loader starts its workers afresh; the samples do not depend on them


@pytest.fixture
def shard_recipe(tiny_recipe, tmp_path):
    out = tmp_path / "packed"
    pack(DATASETS.build("synthetic", num_samples=64, image_size=32), out, shard_size=10, progress=False)

    def make(**kw):
        return tiny_recipe(data={"name": "shards", "root": str(out), "args": {"shuffle_window": 2}}, **kw)

    return make


def test_sslkit_pretrain_trains_on_shards(shard_recipe, tmp_path, monkeypatch):
    import yaml

    orders = []  # the engine must walk the shards in their streaming order, not a uniform permutation
    original = ShardDataset.epoch_order
    monkeypatch.setattr(ShardDataset, "epoch_order", lambda self, g: orders.append(original(self, g)) or orders[-1])
    recipe = tmp_path / "shards.yaml"
    recipe.write_text(yaml.safe_dump(shard_recipe(name="cli")))
    assert main(["pretrain", str(recipe), "trainer.max_steps=3", "trainer.checkpoint_every_steps=0"]) == 0
    run = next((tmp_path / "runs").glob("cli*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["batch_in_epoch"] == 3
    assert len(orders) == 1 and sorted(orders[0].tolist()) == list(range(64))


@pytest.mark.slow
def test_pretrain_on_shards_resumes_bit_exact(shard_recipe):
    full = train(resolve(shard_recipe(name="full"))).run_dir
    part = train(resolve(shard_recipe(name="split")), stop_at_step=5)  # mid-epoch: 4 steps per epoch
    assert part.steps == 5
    resumed = train(resolve(shard_recipe(name="split"), ["data.num_workers=1"]), resume=part.run_dir).run_dir
    a, b = load_file(full / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = load_checkpoint(full / "checkpoints" / "last.ckpt"), load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert ca["step"] == cb["step"] == 8
    assert all(torch.equal(v, cb["objective"][k]) for k, v in ca["objective"].items())
