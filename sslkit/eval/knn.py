"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of DINO (Caron et al., 2021, ``eval_knn.py``, after Wu et al., 2018): cosine similarity between
L2-normalised features, the ``k`` most similar training features vote for their labels with weight
``exp(sim / T)``, and the class with the largest summed weight wins. Top-5 counts a hit when the true class is
among the 5 highest-scoring classes that received a vote (so, as in DINO, top-5 equals top-1 for k = 1).

Search uses a FAISS ``IndexFlatIP`` (exact), on the GPU when CUDA and a GPU build of faiss are present;
queries are processed in chunks, and the result does not depend on the chunk size.

``center=True`` subtracts the bank's mean feature from bank and queries before the L2 normalisation. Raw pixels
need it (Fashion-MNIST k=20: 84.6% without, 86.1% with), and sslkit's reports apply it to every feature
source, pixels and encoders alike, so that they are compared under one protocol; ``center=False`` is DINO's
protocol exactly, and the reports give that figure too.

``whiten=d`` goes one step further than centring: PCA whitening learned on the bank (Jegou & Chum, ECCV 2012,
"Negative evidences and co-occurrences in image retrieval: the benefit of PCA and whitening"; DINO whitens its
copy-detection features the same way). Bank and queries are centred on the bank mean, projected on the bank's
``d`` leading principal axes and each axis divided by its standard deviation, then L2-normalised as usual. It
uses no labels, only the bank's features, so it is still a frozen-feature protocol; it is a different protocol
from DINO's, though, and the reports always give the plain figures next to it.

**Bounded memory.** The default search copies the bank a few times in float32 (centred, normalised, FAISS's
own copy): about 1 GB each for 60k x 4096 features. Above :data:`AUTO_CHUNKED_BYTES` of float32 bank (or when
any of ``bank_dtype`` / ``bank_on_disk`` / ``bank_chunk_size`` is given, or the bank is a :class:`DiskArray`),
the search is chunked instead: the bank mean (and, for whitening, the covariance) is accumulated chunk by chunk,
each bank chunk is centred, projected, L2-normalised and stored once, in float16 or float32, in memory or in a
``.npy`` file on disk written through windowed memory maps; then every bank chunk is read back, multiplied with
the (normalised) queries and merged into a running top-k with ``torch.topk``. Peak memory is then the queries,
one bank chunk and one ``queries x chunk`` block of scores, whatever the bank size. float32 chunks give the
same neighbours as FAISS; float16 storage moves each similarity by at most 2**-11 (unit vectors rounded to
float16), see :data:`FP16_SIM_TOLERANCE`.

Example::

    res = knn_classify(train_f, train_y, test_f, test_y, k=[10, 20])
    res[20]["top1"]  # percent
    res = knn_classify(DiskArray("bank.npy"), train_y, test_f, test_y, k=20, bank_dtype="float16")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_CHUNK_SIZE = 1024
TOPK_ACCURACY = 5  # the "top-5" of top-1/top-5


def faiss_gpu_available() -> bool:
    """True when CUDA is usable and the installed faiss has GPU support."""
    import faiss

    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def center_on(reference: torch.Tensor | np.ndarray, *others: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
    """``reference`` and ``others`` (float32) minus ``reference``'s mean row. ``(N, D)`` each."""
    sets = [torch.as_tensor(t).float() for t in (reference, *others)]
    mean = sets[0].mean(dim=0, keepdim=True)  # (1, D)
    return [t - mean for t in sets]


WHITEN_EPS = 1e-6  # axes whose variance is below this fraction of the largest are dropped (rank-deficient banks)


def pca_whitening(reference: torch.Tensor | np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank's mean and whitening projection: ``(1, D)`` mean and ``(D, d)`` matrix, float32.

    ``(x - mean) @ proj`` has, over ``reference``, zero mean and identity covariance on its ``d`` columns: the
    ``d`` leading principal axes (``d = min(dim, D, numerical rank)``), each scaled by 1/sqrt(its variance).
    The covariance is accumulated in float32 and decomposed in float64 (exact ``eigh``, no randomisation).
    """
    if dim <= 0:
        raise ValueError(f"the whitening dimension must be positive, got {dim}")
    x = torch.as_tensor(reference).float()
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"whitening needs a bank of at least 2 rows (N, D), got {tuple(x.shape)}")
    mean = x.mean(dim=0, keepdim=True)  # (1, D)
    xc = x - mean
    cov = (xc.T @ xc).double() / (len(x) - 1)  # (D, D)
    return mean, whitening_projection(cov, dim)


def whitening_projection(cov: torch.Tensor, dim: int) -> torch.Tensor:
    """``(D, d)`` float32 projection onto the ``d`` leading axes of covariance ``cov`` ``(D, D)``, each axis
    divided by its standard deviation (``d = min(dim, D, numerical rank)``; exact float64 ``eigh``)."""
    var, axes = torch.linalg.eigh(cov.double())  # ascending
    var, axes = var.flip(0), axes.flip(1)
    keep = int((var > WHITEN_EPS * var[0].clamp_min(torch.finfo(torch.float64).tiny)).sum())
    d = max(1, min(dim, keep))
    return (axes[:, :d] / var[:d].sqrt()).float()


def whiten_on(reference: torch.Tensor | np.ndarray, *others: torch.Tensor | np.ndarray,
              dim: int) -> list[torch.Tensor]:
    """``reference`` and ``others`` PCA-whitened with :func:`pca_whitening` of ``reference``: ``(N, d)`` each."""
    mean, proj = pca_whitening(reference, dim)
    return [(torch.as_tensor(t).float() - mean) @ proj for t in (reference, *others)]


def l2_normalize(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as contiguous float32 NumPy (what FAISS wants). ``(N, D) -> (N, D)``."""
    a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    a = np.ascontiguousarray(a, dtype=np.float32)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, np.finfo(np.float32).tiny))


def to_gpu_if_available(index, use_gpu: bool | None = None):  # noqa: ANN001, ANN201 - faiss types
    """Move a FAISS index to GPU 0 when ``use_gpu`` (None = when :func:`faiss_gpu_available`)."""
    import faiss

    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    if not use_gpu:
        return index
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    gpu_index._sslkit_res = res  # keep the resources alive as long as the index
    return gpu_index


def flat_ip_index(bank: np.ndarray, use_gpu: bool | None = None):  # noqa: ANN201
    """Exact inner-product index over ``bank`` ``(N, D)`` float32 (normalise first for cosine)."""
    import faiss

    index = faiss.IndexFlatIP(bank.shape[1])
    index = to_gpu_if_available(index, use_gpu)
    index.add(bank)
    return index


# ----------------------------------------------------------------------------------------------------------
# Bounded memory: a float16 or on-disk bank, searched chunk by chunk
# ----------------------------------------------------------------------------------------------------------

AUTO_CHUNKED_BYTES = 256 << 20  # a bank above this in float32 is searched in chunks (same figures, one copy)
AUTO_FP16_BYTES = 1 << 30  # above this the chunked bank is stored in float16
AUTO_DISK_BYTES = 4 << 30  # a stored bank above this (in its storage dtype) is kept on disk
BANK_CHUNK_ENTRIES = 1 << 20  # bank rows x dims per chunk when no chunk size is given (4 MiB of float32)
BANK_DTYPES = ("float32", "float16")
# Rounding a unit vector b to float16 moves each component by at most 2**-11 of itself (round to nearest), so
# |q . fp16(b) - q . b| <= ||q|| * 2**-11 * ||b|| = 2**-11 for unit q, b: the largest change of a similarity.
FP16_SIM_TOLERANCE = 2.0 ** -11


class DiskArray:
    """A read-only ``(N, D)`` float array in a ``.npy`` file, read window by window.

    ``a[i:j]`` maps only rows ``i:j``, copies them and unmaps them, so reading a file chunk by chunk never holds
    more than a chunk (``np.load(mmap_mode="r")`` keeps every page it has touched resident). ``np.asarray(a)``
    reads the whole file.
    """

    ndim = 2

    def __init__(self, path: str | Path) -> None:
        from sslkit.data.base import DataError

        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path} is not a readable .npy file ({e}); write features with numpy.save or "
                            "sslkit.eval.knn.write_npy_chunks.") from e
        if len(shape) != 2 or fortran or dtype.kind != "f":
            raise DataError(f"{self.path}: a k-NN bank file must hold a C-ordered 2-D float array (rows x dims), "
                            f"got shape {shape}, dtype {dtype}, fortran order {fortran}.")
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), dtype
        self.row_bytes = self.shape[1] * dtype.itemsize
        if self.path.stat().st_size < self.offset + self.shape[0] * self.row_bytes:
            raise DataError(f"{self.path} is truncated: its header promises {shape} {dtype}. Write it again.")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError("DiskArray takes row slices only, e.g. a[0:1024]")
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise TypeError("DiskArray takes contiguous row slices only (step 1)")
        if stop <= start:
            return np.zeros((0, self.shape[1]), self.dtype)
        window = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + start * self.row_bytes,
                           shape=(stop - start, self.shape[1]))
        block = np.array(window)  # a private copy: the window is unmapped when it goes
        del window
        return block

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


def write_npy_chunks(path: str | Path, shape: tuple[int, int], dtype: np.dtype | str,
                     chunks: Iterable[np.ndarray | torch.Tensor], *, durable: bool = True) -> DiskArray:
    """Write consecutive row blocks as one ``.npy`` file of ``shape``, each through its own memory-mapped window
    (so memory holds one block at a time). The file appears at ``path`` only when complete (temporary name, then
    rename; ``durable``: synced to disk first). Returns it as a :class:`DiskArray`."""
    path, dtype = Path(path), np.dtype(dtype)
    rows, dim = int(shape[0]), int(shape[1])
    if rows <= 0 or dim <= 0:
        raise ValueError(f"write_npy_chunks needs a non-empty (rows, dims) shape, got {shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, dim))  # sized, sparse
        offset = header.offset
        del header
        row = 0
        for block in chunks:
            block = block.numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
            if block.ndim != 2 or block.shape[1] != dim or row + len(block) > rows:
                raise ValueError(f"block of shape {block.shape} does not fit rows {row}.. of a {shape} file")
            window = np.memmap(tmp, dtype=dtype, mode="r+", offset=offset + row * dim * dtype.itemsize,
                               shape=block.shape)
            window[:] = block
            del window  # unmapped; the page cache writes it back (no per-chunk msync)
            row += len(block)
        if row != rows:
            raise ValueError(f"the blocks gave {row} rows, the file needs {rows}")
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return DiskArray(path)


def _rows(x: torch.Tensor | np.ndarray | DiskArray, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of any feature source as float32 (may be a view of ``x``: never modify it in place)."""
    block = x[start:stop]
    return (block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block))).float()


def streaming_mean(x: torch.Tensor | np.ndarray | DiskArray, chunk_rows: int) -> torch.Tensor:
    """The mean row ``(1, D)`` float32 of ``x``, summed chunk by chunk in float64 (no full copy)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), chunk_rows):
        total += _rows(x, start, start + chunk_rows).double().sum(dim=0)
    return (total / max(len(x), 1)).float()[None]


def streaming_whitening(x: torch.Tensor | np.ndarray | DiskArray, dim: int,
                        chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pca_whitening` with the covariance accumulated chunk by chunk in float64: ``(1, D)`` mean and
    ``(D, d)`` projection, float32, from two passes over ``x`` (mean, then centred covariance)."""
    if dim <= 0:
        raise ValueError(f"the whitening dimension must be positive, got {dim}")
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"whitening needs a bank of at least 2 rows (N, D), got {tuple(x.shape)}")
    mean = streaming_mean(x, chunk_rows)  # (1, D)
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for start in range(0, len(x), chunk_rows):
        xc = (_rows(x, start, start + chunk_rows) - mean).double()  # (b, D)
        cov += xc.T @ xc
    return mean, whitening_projection(cov / (len(x) - 1), dim)


@dataclass(frozen=True)
class BankTransform:
    """What both bank and queries go through before the search: minus ``mean``, times ``proj``, L2-normalised."""

    mean: torch.Tensor | None = None  # (1, D)
    proj: torch.Tensor | None = None  # (D, d)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, D)`` float32 -> ``(n, d)`` float32 unit rows (a new tensor)."""
        if self.mean is not None:
            x = x - self.mean
        if self.proj is not None:
            x = x @ self.proj
        return x / x.norm(dim=1, keepdim=True).clamp_min(np.finfo(np.float32).tiny)

    def out_dim(self, dim: int) -> int:
        return int(self.proj.shape[1]) if self.proj is not None else dim


@dataclass(frozen=True)
class BankPlan:
    """How a chunked k-NN bank is stored: ``dtype`` (float32 / float16), on disk or not, rows per chunk."""

    dtype: str
    on_disk: bool
    chunk_rows: int


def plan_bank(rows: int, dim: int, *, bank_dtype: str | None = None, on_disk: bool | None = None,
              chunk_size: int | None = None, from_disk: bool = False) -> BankPlan | None:
    """The bank's storage, or None for the default FAISS search over an in-memory float32 copy.

    With every option None (auto), banks up to :data:`AUTO_CHUNKED_BYTES` in float32 get the default search;
    larger ones (and ``from_disk`` sources) are chunked: in float32 (the same figures as the default search, with
    one copy of the bank) up to :data:`AUTO_FP16_BYTES`, in float16 above, on disk above :data:`AUTO_DISK_BYTES`.
    Any option given selects the chunked search; the others stay automatic (float32 for small banks).
    """
    if bank_dtype is not None and bank_dtype not in BANK_DTYPES:
        raise ValueError(f"bank_dtype (--bank-dtype) must be one of {', '.join(BANK_DTYPES)}, got {bank_dtype!r}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"the bank chunk size (--chunk-size) must be a positive number of rows, got {chunk_size}")
    fp32_bytes = rows * dim * 4
    chosen = bank_dtype is not None or on_disk is not None or chunk_size is not None
    if not chosen and not from_disk and fp32_bytes <= AUTO_CHUNKED_BYTES:
        return None
    dtype = bank_dtype or ("float16" if fp32_bytes > AUTO_FP16_BYTES else "float32")
    stored = rows * dim * np.dtype(dtype).itemsize
    disk = on_disk if on_disk is not None else stored > AUTO_DISK_BYTES
    return BankPlan(dtype, bool(disk), int(chunk_size or max(1, BANK_CHUNK_ENTRIES // max(dim, 1))))


class FeatureBank:
    """Bank rows through a :class:`BankTransform`, stored once in ``plan.dtype``, in memory or in a ``.npy`` file
    in a fresh folder under ``directory`` (the system's temporary folder by default; removed by :meth:`close`).

    Built and read chunk by chunk: memory holds one chunk of float32 at a time, plus the stored bank when it is
    in memory. Use as a context manager.
    """

    def __init__(self, source: torch.Tensor | np.ndarray | DiskArray, transform: BankTransform, plan: BankPlan, *,
                 directory: str | Path | None = None, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        self.rows, self.chunk_rows = len(source), plan.chunk_rows
        self.dim = transform.out_dim(int(source.shape[1]))
        starts = range(0, self.rows, self.chunk_rows)
        bar = tqdm(starts, desc=f"k-NN bank ({plan.dtype}{', on disk' if plan.on_disk else ''})", unit="chunk",
                   disable=not progress, leave=False)
        blocks = (transform(_rows(source, s, s + self.chunk_rows)) for s in bar)  # (b, d) float32 each
        self._dir: Path | None = None
        if plan.on_disk:
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="sslkit-knn-bank-", dir=directory))
            self.storage: torch.Tensor | DiskArray = write_npy_chunks(
                self._dir / "bank.npy", (self.rows, self.dim), plan.dtype,
                (b.to(getattr(torch, plan.dtype)) for b in blocks), durable=False)  # scratch: no fsync
        else:
            self.storage = torch.empty(self.rows, self.dim, dtype=getattr(torch, plan.dtype))
            for start, block in zip(starts, blocks):
                self.storage[start:start + len(block)] = block  # rounds to the storage dtype

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, (b, d) float32 rows)`` for each chunk, in order."""
        for start in range(0, self.rows, self.chunk_rows):
            yield start, _rows(self.storage, start, start + self.chunk_rows)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> FeatureBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chunked_topk(bank: FeatureBank, queries: torch.Tensor, k: int, *, query_chunk: int = DEFAULT_CHUNK_SIZE,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products of ``queries`` ``(Q, d)`` float32 with every bank row.

    The bank is read once. For each bank chunk and each block of ``query_chunk`` queries, the block's best ``k``
    in the chunk are merged with its running best ``k`` by ``torch.topk``, so memory holds one chunk, one
    ``(query_chunk, chunk)`` score block and the ``(Q, k)`` running result.

    Returns:
        ``(Q, k')`` float32 similarities, best first, and ``(Q, k')`` long bank rows; ``k' = min(k, N)``.
    """
    from tqdm.auto import tqdm

    k = min(k, bank.rows)
    best_s = torch.full((len(queries), k), -torch.inf)  # (Q, k)
    best_i = torch.full((len(queries), k), -1, dtype=torch.long)  # (Q, k)
    n_chunks = -(-bank.rows // bank.chunk_rows)
    for start, block in tqdm(bank.blocks(), total=n_chunks, desc="k-NN search", unit="chunk", disable=not progress,
                             leave=False):
        for qs in range(0, len(queries), query_chunk):
            sims = queries[qs:qs + query_chunk] @ block.T  # (q, b)
            top_s, top_i = sims.topk(min(k, len(block)), dim=1)  # (q, k) each
            cand_s = torch.cat([best_s[qs:qs + query_chunk], top_s], dim=1)  # (q, 2k)
            cand_i = torch.cat([best_i[qs:qs + query_chunk], top_i + start], dim=1)
            keep_s, pos = cand_s.topk(k, dim=1)
            best_s[qs:qs + query_chunk], best_i[qs:qs + query_chunk] = keep_s, cand_i.gather(1, pos)
    return best_s, best_i


def weighted_vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
                  temperature: float) -> torch.Tensor:
    """Class scores from neighbours (DINO eval_knn).

    Args:
        sims: ``(Q, k)`` cosine similarities of each query's neighbours.
        neighbour_labels: ``(Q, k)`` long, the neighbours' labels.
        num_classes: C.
        temperature: T in ``exp(sim / T)``.

    Returns:
        ``(Q, C)`` summed weights per class.
    """
    weights = (sims.double() / temperature).exp()  # (Q, k); float64 so exp(1/0.07) sums stay exact enough
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64)
    return scores.scatter_add_(1, neighbour_labels, weights)  # (Q, C)


def vote_hits(scores: torch.Tensor, labels: torch.Tensor, topk: int = TOPK_ACCURACY) -> tuple[int, int]:
    """Numbers of top-1 and top-``topk`` hits for class scores ``(Q, C)`` and true labels ``(Q,)``.

    Top-1: ``argmax`` (first class on ties). Top-k: the true class got a vote (score > 0) and fewer than
    ``topk`` classes scored strictly higher.
    """
    top1 = scores.argmax(dim=1) == labels  # (Q,)
    own = scores.gather(1, labels[:, None]).squeeze(1)  # (Q,)
    higher = (scores > own[:, None]).sum(dim=1)  # (Q,)
    topk_hit = (own > 0) & (higher < topk)
    return int(top1.sum()), int(topk_hit.sum())


def _as_ks(k: int | Sequence[int]) -> list[int]:
    ks = [int(k)] if isinstance(k, int | np.integer) else [int(v) for v in k]
    if not ks or any(v <= 0 for v in ks):
        raise ValueError(f"k must be a positive int or a non-empty list of them, got {k!r}")
    return ks


def _check_inputs(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                  test_labels: torch.Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}")
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("one label per feature row is needed")
    if len(train_feats) == 0:
        raise ValueError("the k-NN bank (train features) is empty")
    if (torch.as_tensor(train_labels) < 0).any() or (torch.as_tensor(test_labels) < 0).any():
        raise ValueError("k-NN needs labelled data; found label -1 (unlabelled images)")


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int | list[int] = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 num_classes: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 use_gpu: bool | None = None, center: bool = False, whiten: int | None = None,
                 bank_dtype: str | None = None, bank_on_disk: bool | None = None, bank_chunk_size: int | None = None,
                 bank_dir: str | Path | None = None, progress: bool = False) -> dict:
    """Temperature-weighted k-NN accuracy (DINO ``eval_knn.py``), in percent.

    Args:
        train_feats: ``(N, D)`` bank features; any scale (they are L2-normalised here).
        train_labels: ``(N,)`` long.
        test_feats: ``(Q, D)`` query features.
        test_labels: ``(Q,)`` long.
        k: neighbours; an int, or a list to evaluate several k from one search. k above N is clipped to N.
        temperature: T of the vote weights ``exp(sim / T)``.
        num_classes: C; None = 1 + the largest label seen.
        chunk_size: queries per search call (memory bound only; results do not depend on it).
        use_gpu: FAISS on GPU; None = when available.
        center: subtract the bank's mean feature from both sets before normalising (see the module notes).
        whiten: PCA-whiten both sets to this many dimensions, learned on the bank, before normalising (it
            centres too, so ``center`` is then moot); None = off. See the module notes.
        bank_dtype: "float32" or "float16" storage of a chunked bank; None = auto (:func:`plan_bank`).
        bank_on_disk: keep a chunked bank in a ``.npy`` file; None = auto by size.
        bank_chunk_size: bank rows per chunk of the chunked search; None = auto.
        bank_dir: where an on-disk bank is written (a fresh folder inside, removed afterwards).
        progress: progress bars for a chunked search.

        ``train_feats`` / ``test_feats`` may also be :class:`DiskArray` files (the search is then chunked).

    Returns:
        ``{"top1": %, "top5": %}`` for an int ``k``; ``{k: {"top1": %, "top5": %}}`` for a list.
    """
    _check_inputs(train_feats, train_labels, test_feats, test_labels)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    ks = _as_ks(k)
    train_y = torch.as_tensor(train_labels).long().cpu()  # (N,)
    test_y = torch.as_tensor(test_labels).long().cpu()  # (Q,)
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max() if len(test_y) else 0)) + 1
    k_max = min(max(ks), len(train_feats))
    plan = plan_bank(len(train_feats), int(train_feats.shape[1]), bank_dtype=bank_dtype, on_disk=bank_on_disk,
                     chunk_size=bank_chunk_size,
                     from_disk=isinstance(train_feats, DiskArray) or isinstance(test_feats, DiskArray))
    if plan is None:
        found = _faiss_neighbours(train_feats, test_feats, k_max, chunk_size=chunk_size, use_gpu=use_gpu,
                                  center=center, whiten=whiten)
    else:
        found = _chunked_neighbours(train_feats, test_feats, k_max, plan, chunk_size=chunk_size, center=center,
                                    whiten=whiten, directory=bank_dir, progress=progress)

    hits = {kk: [0, 0] for kk in ks}
    for start, sims_t, idx_t in found:  # (q, k_max) each, best first
        nb_labels = train_y[idx_t]  # (q, k_max)
        y = test_y[start:start + len(idx_t)]  # (q,)
        for kk in ks:
            kc = min(kk, k_max)
            scores = weighted_vote(sims_t[:, :kc], nb_labels[:, :kc], num_classes, temperature)  # (q, C)
            h1, h5 = vote_hits(scores, y)
            hits[kk][0] += h1
            hits[kk][1] += h5
    total = max(len(test_feats), 1)
    results = {kk: {"top1": 100.0 * h1 / total, "top5": 100.0 * h5 / total} for kk, (h1, h5) in hits.items()}
    return results[ks[0]] if isinstance(k, int | np.integer) else results


def _faiss_neighbours(train_feats: torch.Tensor, test_feats: torch.Tensor, k: int, *, chunk_size: int,
                      use_gpu: bool | None, center: bool,
                      whiten: int | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The default search: float32 copies of both sets in memory, FAISS ``IndexFlatIP``. Yields ``(start,
    sims (q, k), rows (q, k))`` per block of ``chunk_size`` queries."""
    if whiten is not None:
        train_feats, test_feats = whiten_on(train_feats, test_feats, dim=int(whiten))
    elif center:
        train_feats, test_feats = center_on(train_feats, test_feats)
    bank = l2_normalize(train_feats)  # (N, D)
    queries = l2_normalize(test_feats)  # (Q, D)
    index = flat_ip_index(bank, use_gpu)
    for start in range(0, len(queries), chunk_size):
        sims, idx = index.search(queries[start:start + chunk_size], k)  # (q, k) each, best first
        yield start, torch.from_numpy(sims), torch.from_numpy(idx)


def _chunked_neighbours(train_feats: torch.Tensor | DiskArray, test_feats: torch.Tensor | DiskArray, k: int,
                        plan: BankPlan, *, chunk_size: int, center: bool, whiten: int | None,
                        directory: str | Path | None,
                        progress: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The bounded-memory search (module notes): streaming centring / whitening, a :class:`FeatureBank` and
    :func:`chunked_topk`. Yields like :func:`_faiss_neighbours`."""
    if whiten is not None:
        transform = BankTransform(*streaming_whitening(train_feats, int(whiten), plan.chunk_rows))
    elif center:
        transform = BankTransform(mean=streaming_mean(train_feats, plan.chunk_rows))
    else:
        transform = BankTransform()
    queries = torch.cat([transform(_rows(test_feats, s, s + chunk_size))
                         for s in range(0, len(test_feats), chunk_size)]) if len(test_feats) else (
        torch.zeros(0, transform.out_dim(int(test_feats.shape[1]))))  # (Q, d)
    with FeatureBank(train_feats, transform, plan, directory=directory, progress=progress) as bank:
        sims, idx = chunked_topk(bank, queries, k, query_chunk=chunk_size, progress=progress)  # (Q, k) each
    for start in range(0, len(queries), chunk_size):
        yield start, sims[start:start + chunk_size], idx[start:start + chunk_size]


def knn_protocols(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                  test_labels: torch.Tensor, *, center: bool = True, whiten: int | None = None, **kw) -> dict:
    """:func:`knn_classify` under ``center`` / ``whiten``, with the plainer protocols alongside: each result also
    carries ``top1_centred`` / ``top5_centred`` (when whitening and centring) and ``top1_uncentred`` /
    ``top5_uncentred`` (DINO's exact protocol; when centring or whitening). ``kw`` goes to :func:`knn_classify`;
    the result has its shape (flat for an int ``k``, per ``k`` for a list)."""
    args = (train_feats, train_labels, test_feats, test_labels)
    main = knn_classify(*args, center=center, whiten=whiten, **kw)
    plainer = ([("centred", True)] if whiten is not None and center else []) + (
        [("uncentred", False)] if whiten is not None or center else [])
    per_k = isinstance(kw.get("k", DEFAULT_K), int | np.integer)
    rows = {None: main} if per_k else main
    for name, c in plainer:
        other = knn_classify(*args, center=c, **kw)
        for kk, row in rows.items():
            got = other if per_k else other[kk]
            row.update({f"top1_{name}": got["top1"], f"top5_{name}": got["top5"]})
    return main


def headline_protocols(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                       test_labels: torch.Tensor, *, center: bool = True, whiten: int | None = None, **kw) -> dict:
    """The k-NN figures a run reports, headline first.

    ``top1`` / ``top5`` are the standard protocol: DINO's weighted vote on L2-normalised features centred on the
    bank mean (``center=False``: DINO's exact, uncentred protocol). ``top1_uncentred`` / ``top5_uncentred`` stand
    beside it when centring. ``whiten=d`` adds ``top1_whitened`` / ``top5_whitened``: PCA-whitened to ``d``
    dimensions on the bank, a different protocol that is labelled as such and never the headline. ``kw`` goes
    to :func:`knn_classify` and must give one ``k``; the result is flat.
    """
    if not isinstance(kw.get("k", DEFAULT_K), int | np.integer):
        raise ValueError("headline_protocols takes one k")
    args = (train_feats, train_labels, test_feats, test_labels)
    out = dict(knn_classify(*args, center=center, **kw))
    if center:
        plain = knn_classify(*args, center=False, **kw)
        out.update(top1_uncentred=plain["top1"], top5_uncentred=plain["top5"])
    if whiten:
        white = knn_classify(*args, center=True, whiten=whiten, **kw)
        out.update(top1_whitened=white["top1"], top5_whitened=white["top5"])
    return out
