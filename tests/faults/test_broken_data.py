"""Training on a folder full of broken and unusual images: bad files are skipped and reported, never a crash."""

import json

import numpy as np
import pytest
from PIL import Image

from sslkit.cli import main
from sslkit.config import resolve
from sslkit.data import DataError
from sslkit.engine import train


def _make_tree(root):
    good = {"rgb.jpg": ("RGB", (40, 40)), "gray.png": ("L", (36, 36)), "palette.png": ("P", (40, 40)),
            "rgba.png": ("RGBA", (40, 40)), "cmyk.jpg": ("CMYK", (40, 40)), "tiny.png": ("RGB", (8, 6))}
    for cls in ("a", "b"):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i in range(3):
            for name, (mode, size) in good.items():
                Image.new(mode, size, color=(i * 40) if mode in ("L", "P") else None).save(d / f"{i}_{name}")
            Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(d / f"{i}_sixteen.png")
    bad = root / "train" / "a"
    full = (bad / "0_rgb.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("this is not an image")
    return ["truncated.jpg", "zero.jpg", "notes.png"]


def _recipe(tmp_path, **data_args):
    return resolve({
        "name": "broken", "output_dir": str(tmp_path / "runs"),
        "data": {"name": "image_folder", "root": str(tmp_path / "data"), "args": data_args, "batch_size": 8,
                 "num_workers": 2},
        "augment": {"name": "simclr", "image_size": 32},
        "encoder": {"name": "vit_tiny_patch4_32", "depth": 1, "embed_dim": 32, "num_heads": 2},
        "objective": {"name": "simclr", "proj_hidden_dim": 32, "proj_out_dim": 16},
        "trainer": {"epochs": 2}, "eval": {"final_knn": False},
    })


def test_bad_files_are_skipped_and_summarised(tmp_path, capsys):
    bad = _make_tree(tmp_path / "data")
    result = train(_recipe(tmp_path))
    assert result.steps > 0
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["skipped_files"] == len(bad)
    logged = (result.run_dir / "bad_files.txt").read_text()
    assert all(name in logged for name in bad)
    assert f"skipped {len(bad)} unreadable file(s)" in capsys.readouterr().out


def test_strict_stops_at_the_first_bad_file_with_its_path(tmp_path):
    _make_tree(tmp_path / "data")
    with pytest.raises(DataError, match=r"cannot read image .*(truncated|zero|notes)"):
        train(_recipe(tmp_path, strict=True))


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{name: image_folder, root: {tmp_path / 'data'}}}\noutput_dir: {tmp_path / 'runs'}\n")
    assert main(["pretrain", str(recipe)]) == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
