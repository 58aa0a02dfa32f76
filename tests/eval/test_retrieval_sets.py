"""Retrieval with explicit query and gallery sets, and copy detection on a user folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sslkit.data.base import DataError
from sslkit.eval import cli
from sslkit.eval.retrieval import (
    Relevance,
    class_relevance,
    copy_detection_metrics,
    folder_dataset,
    load_ground_truth,
    relative_paths,
    set_retrieval_metrics,
)
from tests.eval.test_eval_cli import run_dir  # noqa: F401 - its tiny run (a 1-block ViT on 32 px), as a fixture

# Gallery g0..g5 on the unit circle at these angles; query A sits below g0 (ranking g0 g1 g2 g3 g4 g5), query B
# above g5 (ranking g5 g4 g3 g2 g1 g0), query C anywhere.
GALLERY_ANGLES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
QUERY_ANGLES = [-0.1, 1.1, 0.5]
RELEVANT = [[1, 3, 4], [5, 0], []]  # A: g1 g3 g4; B: g5 g0; C: none (left out of every mean)


def _circle(angles):
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=1).float()


def _hand_computed() -> dict[str, float]:
    """The metrics written out from the rankings.

    A: relevance by rank 0 1 0 1 1 0, R = 3. AP = (1/2 + 2/4 + 3/5) / 3; AP@R looks at ranks 1..3 (0 1 0):
       (1/2) / 3. First relevant at rank 2: recall@1 = 0, recall@5 = 1.
    B: relevance by rank 1 0 0 0 0 1, R = 2. AP = (1/1 + 2/6) / 2; AP@R on ranks 1..2 (1 0): (1/1) / 2.
       recall@1 = recall@5 = 1.
    """
    ap_a, ap_b = (1 / 2 + 2 / 4 + 3 / 5) / 3, (1 / 1 + 2 / 6) / 2
    apr_a, apr_b = (1 / 2) / 3, (1 / 1) / 2
    return {"map": 100 * (ap_a + ap_b) / 2, "map@r": 100 * (apr_a + apr_b) / 2, "recall@1": 100 * (0 + 1) / 2,
            "recall@5": 100 * (1 + 1) / 2}


def test_set_metrics_equal_hand_computed():
    want = _hand_computed()
    assert want["map"] == pytest.approx(60.0) and want["map@r"] == pytest.approx(100 / 3)  # sanity of the sums
    res = set_retrieval_metrics(_circle(QUERY_ANGLES), _circle(GALLERY_ANGLES), Relevance.from_lists(RELEVANT, 6),
                                ks=(1, 5))
    for name, value in want.items():
        assert res[name] == pytest.approx(value), name
    assert res["num_queries"] == 3 and res["num_queries_scored"] == 2 and res["gallery_size"] == 6
    assert res["mean_relevant"] == pytest.approx(2.5)


def test_class_relevance_by_folder_name():
    """Label spaces differ between the folders; relevance follows the names. Queries of a class the gallery lacks
    are not scored."""
    rel = class_relevance(["cat", "dog", "owl"], torch.tensor([1, 0, 2]), ["ant", "cat", "dog"],
                          torch.tensor([2, 1, 0, 1, 2, 2]))
    assert rel.counts.tolist() == [3, 2, 0]  # dog: g0 g4 g5; cat: g1 g3; owl: none
    ids = np.array([[0, 1, 2, 3, 4, 5]] * 3)
    np.testing.assert_array_equal(rel.matrix(0, ids), [[1, 0, 0, 0, 1, 1], [0, 1, 0, 1, 0, 0], [0] * 6])
    np.testing.assert_array_equal(rel.matrix(1, np.array([[3, -1]])), [[1, 0]])  # -1 (nothing found) never counts
    with pytest.raises(DataError, match="share no class folder"):
        class_relevance(["cat"], torch.tensor([0]), ["ant"], torch.tensor([0]))
    with pytest.raises(DataError, match="--ground-truth"):
        class_relevance([], torch.tensor([-1]), ["ant"], torch.tensor([0]))


def _write_images(folder, names, seed):
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def test_ground_truth_file_and_clear_errors(tmp_path):
    q_dir, g_dir = tmp_path / "q", tmp_path / "g"
    _write_images(q_dir, ["a.png", "sub/b.png", "c.png"], 0)
    _write_images(g_dir, [f"g{i}.png" for i in range(6)], 1)
    q_paths = relative_paths(folder_dataset(q_dir, labeled=False), q_dir)
    g_paths = relative_paths(folder_dataset(g_dir, labeled=False), g_dir)
    assert q_paths == ["a.png", "c.png", "sub/b.png"]  # every image below the folder, in sorted order
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"a.png": ["g1.png", "g3.png", "./g4.png"], "sub/b.png": ["g5.png", "g0.png"]}))
    rel = load_ground_truth(gt, q_paths, g_paths)
    assert rel.counts.tolist() == [3, 0, 2]
    res = set_retrieval_metrics(_circle([QUERY_ANGLES[0], QUERY_ANGLES[2], QUERY_ANGLES[1]]),
                                _circle(GALLERY_ANGLES), rel, ks=(1, 5))
    for name, value in _hand_computed().items():  # the same example, query order as the folder lists it
        assert res[name] == pytest.approx(value), name

    gt.write_text(json.dumps({"a.png": ["g1.png"], "missing.png": ["g0.png"]}))
    with pytest.raises(DataError, match=r"1 query path.*--queries folder: missing\.png.*e\.g\. 'a\.png'"):
        load_ground_truth(gt, q_paths, g_paths)
    gt.write_text(json.dumps({"a.png": ["g1.png", "nope/g9.png"]}))
    with pytest.raises(DataError, match=r"gallery path.*--gallery folder: nope/g9\.png"):
        load_ground_truth(gt, q_paths, g_paths)
    gt.write_text(json.dumps({"a.png": "g1.png"}))
    with pytest.raises(DataError, match="one JSON object"):
        load_ground_truth(gt, q_paths, g_paths)
    gt.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_ground_truth(gt, q_paths, g_paths)
    with pytest.raises(DataError, match="does not exist"):
        load_ground_truth(tmp_path / "none.json", q_paths, g_paths)
    with pytest.raises(DataError, match="no query has a relevant"):
        set_retrieval_metrics(_circle([0.1]), _circle([0.2]), Relevance.from_lists([[]], 1))


def _features(run, folder):
    from sslkit.eval.report import load_context

    return load_context(run, progress=False).features_of(folder_dataset(folder), "check").features


def test_cli_retrieval_sets_and_copy_folder(request, tmp_path, capsys):
    """Through the CLI on folders: the figures are set_retrieval_metrics / copy_detection_metrics of the
    encoder's features of those folders; flags that do not go together are clear errors."""
    run = request.getfixturevalue("run_dir")
    q_dir, g_dir, d_dir = tmp_path / "q", tmp_path / "g", tmp_path / "d"
    _write_images(q_dir, ["cat/q0.png", "dog/q1.png", "dog/q2.png"], 0)
    _write_images(g_dir, ["cat/g0.png", "cat/g1.png", "dog/g2.png", "owl/g3.png"], 1)
    _write_images(d_dir, [f"x{i}.png" for i in range(3)], 2)
    assert cli.main(["retrieval", str(run), "--queries", str(q_dir), "--gallery", str(g_dir), "--ks", "1", "2",
                     "--no-progress", "--seed", "0"]) == 0
    got = json.loads((run / "eval" / "retrieval_sets" / "results.json").read_text())
    rel = Relevance.from_labels(np.array([1, 2, 2]), np.array([1, 1, 2, 3]))  # cat = 1, dog = 2, owl = 3
    want = set_retrieval_metrics(_features(run, q_dir), _features(run, g_dir), rel, ks=(1, 2))
    for name in ("map", "map@r", "recall@1", "recall@2"):
        assert got["metrics"][name] == pytest.approx(want[name])
    assert (run / "eval" / "retrieval_sets" / "retrieval_grid.png").is_file()
    assert "folders" in (run / "eval" / "report.md").read_text()

    assert cli.main(["copy", str(run), "--folder", str(g_dir), "--distractors", str(d_dir), "--num-queries", "4",
                     "--no-progress", "--no-plots"]) == 0
    got = json.loads((run / "eval" / "copy_folder" / "results.json").read_text())
    assert got["metrics"]["gallery_size"] == 7 and got["metrics"]["num_queries"] == 4
    assert got["settings"]["num_distractors"] == 3
    from sslkit.eval.report import load_context, make_copy_queries

    ctx = load_context(run, progress=False)
    copies, src = make_copy_queries(folder_dataset(g_dir), 4, 0)
    gallery = torch.cat([_features(run, g_dir), _features(run, d_dir)])
    want = copy_detection_metrics(ctx.features_of(copies, "check").features, src, gallery)
    assert got["metrics"]["map"] == pytest.approx(want["map"]) and not math.isnan(want["map"])

    capsys.readouterr()
    assert cli.main(["retrieval", str(run), "--queries", str(q_dir), "--no-progress"]) == 2
    assert "--queries and --gallery go together" in capsys.readouterr().err
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"cat/q0.png": ["cat/missing.png"]}))
    assert cli.main(["retrieval", str(run), "--queries", str(q_dir), "--gallery", str(g_dir), "--ground-truth",
                     str(gt), "--no-progress"]) == 2
    assert "cat/missing.png" in capsys.readouterr().err
    assert cli.main(["retrieval", str(run), "--queries", str(q_dir), "--gallery", str(g_dir), "--test-subset",
                     "2", "--no-progress"]) == 2
    assert "--test-subset does not apply" in capsys.readouterr().err
