"""Verify candidate duplicate pairs at the pixel level: is one image a (cropped, resized, re-encoded, recoloured) copy
of the other?

Copy detection runs in two stages: a recall-oriented search over descriptors proposes candidate pairs
(:func:`sslkit.curate.graph.match`), then each pair is checked on the pixels. The check here asks, in both
directions, whether image B is a box of image A:

1. both images become grayscale thumbnails (the mean of the channels: a tint moves them together), stretched
   to a square;
2. coarse search, at half the thumbnail's resolution: the box in A has B's aspect ratio (a copy is resized
   uniformly) and an area between ``MIN_CROP_AREA`` and the whole of A, over ``SCALE_STEPS`` sizes plus the size
   B's pixel dimensions imply (a crop that was not resized), and over every offset at the template's resolution;
3. fine search, at full resolution, around the better direction's best box: ``REFINE_ROUNDS`` rounds of a local
   grid (one step left/right, up/down, smaller/larger), each with half the step of the last;
4. the score is the normalised cross-correlation of B with the best box (Pearson's r over the pixels: a
   brightness or contrast change leaves it unchanged), both first reduced to the resolution of the poorer one
   (the fewer pixels per side of B and of the box in A), so that a shrunk copy is not penalised for the detail
   it lost.

Scores are kept on disk (:class:`ScoreCache`) under keys made of both images' paths, sizes and mtimes: an
interrupted verification resumes with the pairs not yet scored, and a rerun (another ``--verify-threshold``, a
pool with a few images changed) scores only the pairs it has not seen.

A pair is a duplicate when its score reaches ``threshold`` (``DEFAULT_VERIFY_THRESHOLD``, tuned on a development
split; ``benchmarks/curate_dedup.py`` reports it on held-out images). All boxes of a scale are scored at once: A
is sampled onto a canvas (``grid_sample``) and B's template slides over it as a grouped convolution. The cost is
linear in the number of pairs, which :func:`cap_pairs` caps at ``VERIFY_CAP`` per image.

Example::

    s = verify_pairs(emb.files, emb.files, i, j, emb.dims, emb.dims)  # (P,) best correlation per pair
    dup = s >= DEFAULT_VERIFY_THRESHOLD
"""

from __future__ import annotations

import io
import math
import os
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

THUMB_SIZE = 48  # side of the grayscale thumbnail an image is reduced to (stretched to a square)
TEMPLATE_SIZE = 16  # side of the template the smaller image is resized to; offsets step one template pixel
MIN_CROP_AREA = 0.5  # the smallest box (fraction of the larger image's area) a copy may have been cut from
SCALE_STEPS = 8  # box sizes searched, evenly in side length from the whole image down to MIN_CROP_AREA
FINE_SIZE = 32  # side of the grid the refined boxes are compared on
DETAIL_STEP = 4  # the compared resolution is rounded to a multiple of this many pixels (one batch per level)
REFINE_ROUNDS = 3  # local search rounds around the coarse box, each with half the step of the last
DEFAULT_VERIFY_THRESHOLD = 0.995  # normalised cross-correlation; benchmarks/curate_dedup.py measures around it
VERIFY_CAP = 30  # candidates verified per image (its most similar), so the cost is linear in the collection
PAIR_BATCH = 256  # pairs verified at a time
CACHE_CHUNK = 16_384  # scored pairs written to the score cache at a time
EPS = 1e-6


def thumbnails(files: list[Path], rows: np.ndarray, size: int = THUMB_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale ``(len(rows), size, size)`` uint8 thumbnails and ``(len(rows),)`` aspect ratios (width / height).

    An image that cannot be read any more gets a flat thumbnail, which correlates with nothing.
    """
    from sslkit.data.image_folder import decode_image

    out = np.zeros((len(rows), size, size), np.uint8)
    aspect = np.ones(len(rows), np.float32)
    for n, r in enumerate(np.asarray(rows).tolist()):
        try:
            im = decode_image(files[r]).float().mean(0, keepdim=True)  # (1, H, W)
        except Exception:  # noqa: BLE001 - vanished or corrupted since it was embedded: never verified
            continue
        aspect[n] = im.shape[2] / im.shape[1]
        small = F.interpolate(im[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[n] = small[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out, aspect


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Zero mean per channel, unit norm over all of ``(P, C, h, w)``."""
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return x / x.square().sum(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(EPS)


def box_grid(x0: torch.Tensor, y0: torch.Tensor, w: torch.Tensor, h: torch.Tensor, size: int) -> torch.Tensor:
    """``grid_sample``'s sampling grid (``align_corners=False``) for axis-aligned boxes: ``(N, size, size, 2)``.

    ``x0, y0, w, h``: ``(N,)`` box left, top, width and height as fractions of the image (a box may reach past it).
    The points are those of ``F.affine_grid`` with the box's scale-and-shift matrix, built by broadcasting: on a
    CPU, ``affine_grid``'s batched matrix product cost more than the sampling itself.
    """
    base = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres in [-1, 1]
    gx = w[:, None] * base + (2 * x0 + w - 1)[:, None]  # (N, size)
    gy = h[:, None] * base + (2 * y0 + h - 1)[:, None]
    return torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1)


def window_means(x: torch.Tensor, k: int) -> torch.Tensor:
    """Means over every ``k x k`` window of ``(N, C, S, S)``: ``(N, C, S - k + 1, S - k + 1)``, as
    ``F.avg_pool2d(x, k, stride=1)``, from a summed-area table (in float64: four sums per window instead of k^2)."""
    sat = F.pad(x.double().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    sums = sat[..., k:, k:] - sat[..., :-k, k:] - sat[..., k:, :-k] + sat[..., :-k, :-k]
    return (sums / (k * k)).to(x.dtype)


def _whole(p: int, size: int) -> torch.Tensor:
    """The grid that samples all of each of ``p`` images at ``size`` squared points."""
    one, zero = torch.ones(p), torch.zeros(p)
    return box_grid(zero, zero, one, one, size)


def _sample_boxes(a: torch.Tensor, grid: torch.Tensor, padding: str) -> torch.Tensor:
    """Sample each of ``(P, C, S, S)`` through its H grids ``(P * H, s, s, 2)`` -> ``(P * H, C, s, s)``: the H grids
    are stacked along the height, so A is never copied H times."""
    p, c = a.shape[:2]
    h, s = grid.shape[0] // p, grid.shape[1]
    out = F.grid_sample(a, grid.reshape(p, h * s, *grid.shape[2:]), mode="bilinear", padding_mode=padding,
                        align_corners=False)  # (P, C, H * s, s')
    return out.reshape(p, c, h, s, -1).transpose(1, 2).reshape(p * h, c, s, -1)


def box_sizes(aspect_a: torch.Tensor, aspect_b: torch.Tensor, exact: torch.Tensor | None = None,
              steps: int = SCALE_STEPS, min_area: float = MIN_CROP_AREA) -> torch.Tensor:
    """Box sizes ``(P, H, 2)`` (width, height as fractions of A) with B's aspect ratio, for H hypotheses.

    ``exact`` ``(P, 2)``: B's pixel size over A's, the box of a crop that was not resized (added when it fits).
    """
    r = (aspect_b / aspect_a).sqrt()[:, None]  # (P, 1): box width / height in A's unit square, square-rooted
    side = torch.linspace(1.0, math.sqrt(min_area), steps)[None]  # (1, S): square root of the area
    sizes = torch.stack([(side * r).clamp(max=1.0), (side / r).clamp(max=1.0)], dim=-1)  # (P, S, 2)
    if exact is not None:
        fits = (exact <= 1.0).all(1) & (exact.prod(1) >= min_area)
        sizes = torch.cat([sizes, torch.where(fits[:, None], exact, sizes[:, 0])[:, None]], dim=1)
    return sizes.clamp(min=min_area)


def crop_correlation(a: torch.Tensor, b: torch.Tensor, sizes: torch.Tensor,
                     template: int = TEMPLATE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Best correlation of B with a box of A, over box ``sizes`` and every offset: ``(P,)``, and that box
    ``(P, 4)`` (left, top, width, height as fractions of A).

    Args:
        a, b: ``(P, C, S, S)`` float maps (any range; C channels are correlated jointly).
        sizes: ``(P, H, 2)`` box width and height as fractions of A, each at least 0.5.
    """
    p, c = a.shape[:2]
    h = sizes.shape[1]
    t = template
    # The template samples all of B the way the canvas samples A, so an exact copy scores 1.
    tmpl = _unit(F.grid_sample(b, _whole(p, t), mode="bilinear", align_corners=False))
    # A canvas of 2t pixels, each a box's width / t of A, covers A from its left edge out to twice the box width
    # (>= A's width); offset o of the template on the canvas is the box at o * width / t.
    bw, bh = sizes[..., 0].reshape(-1), sizes[..., 1].reshape(-1)  # (P * H,)
    zero = torch.zeros_like(bw)
    grid = box_grid(zero, zero, 2 * bw, 2 * bh, 2 * t)
    canvas = _sample_boxes(a, grid, "zeros")  # (P * H, C, 2t, 2t)
    weight = tmpl.repeat_interleave(h, 0)  # (P * H, C, t, t)
    dot = F.conv2d(canvas.reshape(1, p * h * c, 2 * t, 2 * t), weight, groups=p * h)[0]  # (P * H, t + 1, t + 1)
    mean = window_means(canvas, t)  # (P * H, C, t + 1, t + 1): box means per channel
    energy = window_means(canvas.square(), t)
    norm = ((energy - mean.square()).clamp_min(0).sum(1) * t * t).sqrt()
    ncc = dot / norm.clamp_min(EPS)  # the template has zero mean, so <box, tmpl> = <box - mean, tmpl>
    # offsets whose box stays inside A (a 2% margin absorbs rounding of the crop's pixel size)
    o = torch.arange(t + 1, dtype=torch.float32)
    ok_x = o[None] * bw[:, None] / t + bw[:, None] <= 1.02  # (P * H, t + 1)
    ok_y = o[None] * bh[:, None] / t + bh[:, None] <= 1.02
    ncc = ncc.masked_fill(~(ok_y[:, :, None] & ok_x[:, None, :]), -1.0)
    score, best = ncc.reshape(p, -1).max(1)
    hyp, off = best // (t + 1) ** 2, best % (t + 1) ** 2
    bw, bh = sizes[torch.arange(p), hyp].unbind(-1)
    box = torch.stack([(off % (t + 1)) * bw / t, (off // (t + 1)) * bh / t, bw, bh], dim=1)  # (P, 4) x0 y0 w h
    return score, box


def _low_pass(x: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Each ``(N, C, s, s)`` map reduced to ``pixels[n]`` (rounded to ``DETAIL_STEP``) per side and back."""
    s = x.shape[-1]
    levels = (pixels / DETAIL_STEP).round().clamp(1) * DETAIL_STEP
    out = x.clone()
    for level in torch.unique(levels).tolist():
        if level >= s:
            continue
        m = levels == level
        small = F.interpolate(x[m], size=(int(level), int(level)), mode="bilinear", antialias=True,
                              align_corners=False)
        out[m] = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    return out


def box_correlation(a: torch.Tensor, b: torch.Tensor, boxes: torch.Tensor, size: int = FINE_SIZE,
                    detail: torch.Tensor | None = None) -> torch.Tensor:
    """Correlation of all of B with each box of A, both sampled at ``size`` squared points. ``(P, R)``.

    ``boxes``: ``(P, R, 4)`` (left, top, width, height) as fractions of A. ``detail``: ``(P,)`` pixels per side
    both are reduced to first (the resolution of the poorer image), or None.
    """
    p, c = a.shape[:2]
    r = boxes.shape[1]
    tmpl = F.grid_sample(b, _whole(p, size), mode="bilinear", align_corners=False)  # (P, C, s, s)
    grid = box_grid(*boxes.reshape(-1, 4).unbind(1), size)  # (P * R, s, s, 2)
    box = _sample_boxes(a, grid, "border")  # (P * R, C, s, s)
    if detail is not None:
        box, tmpl = _low_pass(box, detail.repeat_interleave(r)), _low_pass(tmpl, detail)
    return (_unit(box).reshape(p, r, -1) * _unit(tmpl).reshape(p, 1, -1)).sum(-1)


def refine(a: torch.Tensor, b: torch.Tensor, box: torch.Tensor, rounds: int = REFINE_ROUNDS,
           template: int = TEMPLATE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Best correlation at ``FINE_SIZE`` around the coarse ``box`` ``(P, 4)`` of A: ``(P,)``, and that box.

    Each round tries the 27 boxes one step left/right, up/down and smaller/larger (about the centre), keeps the
    best and halves the step; the first step is half the coarse search's offset step.
    """
    step = box[:, 2:] / template / 2  # (P, 2)
    d = torch.tensor([-1.0, 0.0, 1.0])
    dx, dy, ds = torch.meshgrid(d, d, d, indexing="ij")
    moves = torch.stack([dx.flatten(), dy.flatten(), ds.flatten()], 1)  # (27, 3)
    score = None
    for _ in range(rounds):
        grow = moves[None, :, 2:] * step[:, None, :]  # (P, 27, 2) added to the width and height
        wh = (box[:, None, 2:] + grow).clamp(MIN_CROP_AREA, 1.0)
        xy = box[:, None, :2] - (wh - box[:, None, 2:]) / 2 + moves[None, :, :2] * step[:, None, :]
        xy = torch.minimum(xy.clamp_min(0.0), 1.0 - wh)
        cand = torch.cat([xy, wh], -1)  # (P, 27, 4)
        scores = box_correlation(a, b, cand)
        score, best = scores.max(1)
        box = cand[torch.arange(len(box)), best]
        step = step / 2
    return score, box


def pair_scores(a: np.ndarray, b: np.ndarray, aspect_a: np.ndarray, aspect_b: np.ndarray, dims_a: np.ndarray,
                dims_b: np.ndarray) -> np.ndarray:
    """Best correlation of each pair over both directions (B a box of A, A a box of B). ``(P,)`` float32.

    ``a``, ``b``: ``(P, S, S)`` uint8 thumbnails; ``dims_*``: ``(P, 2)`` pixel width and height.
    """
    ta = torch.from_numpy(a).float()[:, None]  # (P, 1, S, S)
    tb = torch.from_numpy(b).float()[:, None]
    asp_a, asp_b = torch.from_numpy(aspect_a).float(), torch.from_numpy(aspect_b).float()
    da, db = torch.from_numpy(dims_a).float().clamp_min(1), torch.from_numpy(dims_b).float().clamp_min(1)
    # coarse: every box on half-resolution thumbnails (less aliasing), in both directions
    sa, sb = F.avg_pool2d(ta, 2), F.avg_pool2d(tb, 2)
    ab, box_ab = crop_correlation(sa, sb, box_sizes(asp_a, asp_b, db / da))
    ba, box_ba = crop_correlation(sb, sa, box_sizes(asp_b, asp_a, da / db))
    # fine: around the better direction's box, at full resolution
    flip = (ba > ab)[:, None, None, None]
    big, small = torch.where(flip, tb, ta), torch.where(flip, ta, tb)
    box = torch.where(flip[:, :, 0, 0], box_ba, box_ab)
    box = refine(big, small, box)[1]
    # final: both at the detail the poorer of them holds (a copy shrunk to 14 pixels has lost its source's fine
    # texture; comparing at 14 pixels scores it as the copy it is, while two distinct items still differ there)
    d_big, d_small = torch.where(flip[:, :, 0, 0], db, da), torch.where(flip[:, :, 0, 0], da, db)
    pixels = torch.minimum(d_small, box[:, 2:] * d_big).amin(1)  # (P,) the fewer pixels per side
    return box_correlation(big, small, box[:, None], detail=pixels)[:, 0].numpy().astype(np.float32)


def cap_pairs(i: np.ndarray, j: np.ndarray, sim: np.ndarray, k: int) -> np.ndarray:
    """Indices of the pairs kept when every image keeps only its ``k`` most similar candidates (a pair stays if
    it is among the best ``k`` of either image), best first: the verification cost is at most ``2 k`` per image."""
    if len(i) == 0:
        return np.zeros(0, np.int64)
    i, j, sim = np.asarray(i), np.asarray(j), np.asarray(sim)
    ends = np.r_[i, j]  # every pair under both of its images
    pair = np.r_[np.arange(len(i)), np.arange(len(i))]
    by_end = np.lexsort((-np.r_[sim, sim], ends))  # image, then best first
    e = ends[by_end]
    start = np.r_[0, np.flatnonzero(np.diff(e)) + 1]
    rank = np.arange(len(e)) - np.repeat(start, np.diff(np.r_[start, len(e)]))
    keep = np.zeros(len(i), bool)
    keep[pair[by_end[rank < k]]] = True
    order = np.argsort(-sim, kind="stable")
    return order[keep[order]]


def settings_key() -> str:
    """A digest of everything a score depends on besides the two images: the score cache keeps the scores of other
    settings in another folder."""
    import hashlib

    parts = ("verify-v1", THUMB_SIZE, TEMPLATE_SIZE, MIN_CROP_AREA, SCALE_STEPS, FINE_SIZE, DETAIL_STEP, REFINE_ROUNDS)
    return hashlib.blake2b(repr(parts).encode(), digest_size=6).hexdigest()


class ScoreCache:
    """Verified pair scores in a folder of ``.npz`` files (``keys`` uint64, ``scores`` float32), each written
    atomically.

    A pair's key mixes the stamps (:attr:`sslkit.curate.embed.Embeddings.stamps`) of its two images in order,
    so a changed, moved or
    re-encoded image never reuses a score. :meth:`finish` rewrites the folder as one file holding the last
    complete call's pairs, which bounds its size; files that cannot be read are ignored.
    """

    def __init__(self, directory: Path, stamps_a: np.ndarray, stamps_b: np.ndarray) -> None:
        self.dir, self.stamps_a, self.stamps_b = Path(directory), stamps_a, stamps_b
        self._seen: list[Path] = []

    def keys(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """``(P,)`` uint64 key of each pair (row ``i`` of the first collection, row ``j`` of the second)."""
        x = self.stamps_a[i] ^ (self.stamps_b[j] * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found (P,) bool, scores (P,) float32)`` from the files in the folder."""
        known_k, known_s = [np.zeros(0, np.uint64)], [np.zeros(0, np.float32)]
        for f in sorted(self.dir.glob("*.npz")) if self.dir.is_dir() else []:
            try:
                with np.load(f, allow_pickle=False) as z:
                    k, s = z["keys"], z["scores"]
            except (OSError, ValueError, KeyError):
                continue  # a damaged or foreign file: its pairs are scored again
            if k.dtype == np.uint64 and s.dtype == np.float32 and k.shape == s.shape and k.ndim == 1:
                known_k.append(k)
                known_s.append(s)
                self._seen.append(f)
        k, s = np.concatenate(known_k), np.concatenate(known_s)
        order = np.argsort(k, kind="stable")
        k, s = k[order], s[order]
        pos = np.minimum(np.searchsorted(k, keys), max(len(k) - 1, 0))
        found = (k[pos] == keys) if len(k) else np.zeros(len(keys), bool)
        return found, np.where(found, s[pos] if len(k) else 0.0, 0.0).astype(np.float32)

    def add(self, keys: np.ndarray, scores: np.ndarray) -> None:
        """Write the pairs ``keys`` with their ``scores`` as a new file."""
        from sslkit.run import atomic_write_bytes

        if len(keys) == 0:
            return
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(keys, np.uint64), scores=np.asarray(scores, np.float32))
        path = self.dir / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.npz"
        atomic_write_bytes(path, buf.getvalue())
        self._seen.append(path)

    def finish(self, keys: np.ndarray, scores: np.ndarray) -> None:
        """Keep only this call's pairs: one file for all of them; the files read or written before go."""
        old, self._seen = self._seen, []
        self.add(keys, scores)
        for f in old:
            f.unlink(missing_ok=True)


def verify_pairs(files_a: list[Path], files_b: list[Path], i: np.ndarray, j: np.ndarray, dims_a: np.ndarray,
                 dims_b: np.ndarray, *, batch: int | None = None, progress: bool = False, desc: str = "verify",
                 cache: ScoreCache | None = None) -> np.ndarray:
    """Correlation score ``(P,)`` of each candidate pair (``files_a[i[p]]``, ``files_b[j[p]]``).

    Each image involved in a pair still to score is decoded once into a thumbnail (``THUMB_SIZE`` squared
    bytes each). ``batch``: pairs scored at a time (default ``PAIR_BATCH``). With ``cache``, known pairs are
    read from it and new scores are written to it every ``CACHE_CHUNK`` pairs, so an interrupted call loses at
    most that many.
    """
    from tqdm.auto import tqdm

    batch = batch or PAIR_BATCH
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    scores = np.zeros(len(i), np.float32)
    if len(i) == 0:
        return scores
    todo = np.arange(len(i))
    if cache is not None:
        keys = cache.keys(i, j)
        found, known = cache.lookup(keys)
        scores[found] = known[found]
        todo = np.flatnonzero(~found)
    same = files_a is files_b
    ti, tj = i[todo], j[todo]
    rows_a = np.unique(np.r_[ti, tj]) if same else np.unique(ti)
    thumb_a, asp_a = thumbnails(files_a, rows_a)
    pos_a = np.searchsorted(rows_a, ti)
    if same:
        thumb_b, asp_b, pos_b = thumb_a, asp_a, np.searchsorted(rows_a, tj)
    else:
        rows_b = np.unique(tj)
        thumb_b, asp_b = thumbnails(files_b, rows_b)
        pos_b = np.searchsorted(rows_b, tj)
    bar = tqdm(total=len(i), initial=len(i) - len(todo), desc=desc, unit="pair", disable=not progress,
               dynamic_ncols=True)
    unsaved = 0
    for s in range(0, len(todo), batch):
        pa, pb, sel = pos_a[s:s + batch], pos_b[s:s + batch], todo[s:s + batch]
        scores[sel] = pair_scores(thumb_a[pa], thumb_b[pb], asp_a[pa], asp_b[pb], dims_a[i[sel]], dims_b[j[sel]])
        bar.update(len(sel))
        unsaved += len(sel)
        if cache is not None and unsaved >= CACHE_CHUNK:  # the tail goes with finish()
            done = todo[s + len(sel) - unsaved:s + len(sel)]
            cache.add(keys[done], scores[done])
            unsaved = 0
    bar.close()
    if cache is not None:
        cache.finish(keys, scores)
    return scores
