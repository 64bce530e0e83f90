"""grain input pipelines for SFT, GRPO and evaluation.

Stages of one pipeline (all deterministic given the seed)::

    Schedule (host-local MapDataset of (source, record, epoch) slots: shuffling, task mixing,
              per-epoch drop of the incomplete global batch, per-host sharding)
      -> map(LoadExample)      image decode + resize/patchify, prompt/target tokens, mRoPE
                               (in `worker_count` grain worker processes when > 0)
      -> BatchIterDataset      skip-and-count or raise on bad records, bucketed collation

Sharding: the *global* order is one sequence; global batch ``b`` is slots
``[b*G, (b+1)*G)`` with ``G = batch_size * process_count``, and host ``h`` reads the contiguous
``[b*G + h*B, b*G + (h+1)*B)`` of it. Every host therefore sees the same number of batches and
the union of hosts equals the single-host run.

Mixing (spec §6.1, §7.1):

* ``"concat"`` (GRPO reference): all records concatenated; each epoch a seeded permutation; the
  incomplete final global batch of an epoch is dropped (spec §7.1 drops the incomplete chunk).
* ``"interleave"`` (SFT reference): each slot draws IQA with probability ``p_iqa``, else IAA;
  each task's pool is walked in a seeded permutation and restarts (reshuffled) when exhausted;
  the epoch ends when every pool has been exhausted at least once (``"all_exhausted"``, the
  smaller pool is oversampled) or when the first pool is (``"first_exhausted"``).
* Evaluation: natural order, one pass, nothing dropped: the last batch is filled with rows
  flagged ``valid = False``.

Bad records (fixes B5): ``bad_record="error"`` raises :class:`BadRecordError` naming the
dataset, manifest file and row, the image and what is wrong; ``"skip"`` drops the record (never
substitutes another one for it) and refills its batch from the next records of this host's
order, so a batch of bad records does not stop the run. Each skipped record is logged once
(dataset, manifest file, row, image, reason; a record failing again in a later epoch is not
logged again) and counted per dataset together with the manifest rows the loader rejected:
``batch.stats.skipped_by_dataset`` (distinct records so far), ``.num_skipped`` (failed reads so
far), ``.skipped`` (this batch's). When one dataset's skipped records exceed
``max_skip_fraction`` of its manifest rows (per host: of the host's share) the pipeline raises
:class:`TooManySkippedError` with the count: a wrong image root or a damaged copy stops the run
early instead of training on what is left. When a finite host order runs out, the remaining
batches are padding rows (``valid = False``, no SFT labels) up to the schedule's batch count, so
every host yields the same number of batches. Trainers must mask rows with
``batch.meta.valid = False`` (GRPO: no rollout reward/loss).

Batches are frozen :class:`tatar_jax.data.batch.Batch` values carrying their layout (mRoPE
positions, rope deltas, the patch bucket and, with ``PipelineOptions.vision``, its vision
layout), computed here once and consumed as they are.

State: ``it.get_state()`` / ``it.set_state(state)`` (JSON-serialisable dicts; grain's
``DatasetIterator`` checkpoint protocol, so orbax's grain handler saves it) restore the exact
position, mid-epoch, with or without worker processes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from tatar_jax.data import batch as batch_mod
from tatar_jax.data import examples as ex
from tatar_jax.data import prompts

STAGES = ("grpo", "sft", "eval")


class BadRecordError(ValueError):
    """A record that cannot become an example; the message names dataset, row and file."""


class TooManySkippedError(BadRecordError):
    """More records of one dataset were skipped than ``max_skip_fraction`` allows."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset's records for the pipeline.

    ``records`` is any random-access sequence (a list, or a lazy view over a TFDS data source) of
    mappings with ``gt_100`` (float, already on 0-100), ``row_id`` (int, manifest row), either
    ``image`` (a resolved file path) or ``image_bytes`` (encoded image; ``image`` then only names
    it), and for SFT ``target`` (the rationale text).
    """

    name: str
    task: str
    records: Sequence[Mapping[str, Any]]
    num_skipped_rows: int = 0  # rows the manifest loader dropped (its on_error="skip")
    skipped_rows: tuple[Any, ...] = ()  # those rows (manifest.BadRow or dicts), for the log

    def __post_init__(self) -> None:
        if self.task not in prompts.TASK_IDS:
            raise ValueError(f"source {self.name!r}: task must be one of {prompts.TASKS}")


def source_from_loaded(loaded: Any) -> Source:
    """A :class:`Source` from ``manifest.load_records(spec)``'s result."""
    return Source(
        loaded.spec.name, loaded.spec.task, loaded.records,
        num_skipped_rows=loaded.num_skipped, skipped_rows=tuple(loaded.skipped),
    )  # fmt: skip


def sources_from_specs(
    specs: Sequence[Any],
    *,
    on_error: str = "error",
    reference_compat: bool = False,
    seed: int = 42,
) -> list[Source]:
    """Load ``manifest.DatasetSpec`` declarations (manifest rows checked, images not opened)."""
    from tatar_jax.data import manifest

    return [
        source_from_loaded(
            manifest.load_records(
                spec, on_error=on_error, reference_compat=reference_compat, seed=seed
            )
        )
        for spec in specs
    ]


def source_from_tfds(path: str, split: str = "train", name: str | None = None) -> Source:
    """A :class:`Source` reading a split staged by ``tfds_builder.build`` (no TensorFlow).

    Records carry the image bytes, so workers decode from the array_record files, not the
    original image folder. Name and task come from the staged records unless ``name`` is given.
    """
    from tatar_jax.data import tfds_builder

    recs = tfds_builder.load(path, split)
    if len(recs) == 0:
        raise ValueError(f"{path}: split {split!r} is empty")
    first, skipped = recs[0], tuple(recs.skipped())
    return Source(
        name or first["dataset"], first["task"], recs, num_skipped_rows=len(skipped),
        skipped_rows=skipped,
    )  # fmt: skip


def sources_from_synthetic(specs: Mapping[str, Any], split: str = "train") -> list[Source]:
    """The IQA and IAA sources of one split of ``synthetic.ensure_synthetic(root)``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return sources_from_specs([specs[f"synthetic-{t}-{split}"] for t in prompts.TASKS])


MIXINGS = ("concat", "interleave", "stratified")


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How to read. Field names follow ``configs/common.py:data_config`` where they overlap."""

    stage: str = "grpo"
    batch_size: int = 16  # per host (unique prompts per host for GRPO)
    seq_buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    patch_buckets: tuple[int, ...] | None = None  # None: m * 2**k, m in 4..7 (<= 25 % pad)
    padding_side: str | None = None  # None: left for grpo/eval (generation), right for sft
    mixing: str = "concat"  # "concat" | "interleave" | "stratified"
    p_iqa: float = 0.5
    stopping: str = "all_exhausted"  # "all_exhausted" | "first_exhausted" (not for concat)
    num_epochs: int | None = 1  # None = repeat forever
    shuffle: bool = True
    seed: int = 42
    worker_count: int = 0  # grain worker processes decoding images (0 = in-process threads)
    worker_buffer_size: int = 2  # examples buffered per worker
    read_threads: int = 4  # threads per process running the map
    bad_record: str = "error"  # "error" | "skip"
    max_skip_fraction: float = 0.01  # "skip": stop when a dataset loses more than this share
    min_pixels: int = 3136
    max_pixels: int = 1572864
    upscale_min_side: int = 28  # images with a side below this are upscaled (spec §3)
    prompt_variant: str = "train"
    p_drop_think: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"iqa": 0.0, "iaa": 0.0}
    )
    tokenizer_dir: str | None = None  # checkpoint dir with tokenizer.json; None = rebuild
    use_chat_template: bool = True  # use the checkpoint's chat template when it has one
    process_index: int | None = None  # None: jax.process_index()
    process_count: int | None = None  # None: jax.process_count()
    # The model config's ``vision`` (patch, merge and window sizes): each batch carries the
    # vision layout of its patch bucket (None: no layout, e.g. reading data without a model).
    vision: Any = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.stopping not in ("all_exhausted", "first_exhausted"):
            raise ValueError(f"unknown stopping {self.stopping!r}")
        if self.bad_record not in ("error", "skip"):
            raise ValueError(f"bad_record must be 'error' or 'skip', got {self.bad_record!r}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if not 0.0 <= self.p_iqa <= 1.0:
            raise ValueError(f"p_iqa must be in [0, 1], got {self.p_iqa}")
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if self.patch_buckets and any(int(b) % 4 for b in self.patch_buckets):
            # The vision tower merges 2x2 patches: padded patch counts must divide by 4.
            raise ValueError(f"patch_buckets must be multiples of 4, got {self.patch_buckets}")

    @property
    def side(self) -> str:
        return self.padding_side or ("right" if self.stage == "sft" else "left")


def _host(opts: PipelineOptions) -> tuple[int, int]:
    if opts.process_index is not None and opts.process_count is not None:
        idx, cnt = opts.process_index, opts.process_count
    else:
        import jax  # only to ask which host we are

        idx, cnt = jax.process_index(), jax.process_count()
    if not 0 <= idx < cnt:
        raise ValueError(f"process_index {idx} not in [0, {cnt})")
    return idx, cnt


# --------------------------------------------------------------------------------------------
# Schedule


class Schedule(Sequence):
    """Host-local slots ``k -> (source, record, epoch, global_slot, visit)``.

    ``source = -1`` marks an evaluation filler slot. ``visit`` counts how often the record's
    task pool restarted earlier in this epoch (interleave oversampling; 0 otherwise), so the
    thought-dropout draw of a repeated record is a fresh one.

    Pure function of (sizes, options); each worker process rebuilds the epochs it needs.
    """

    def __init__(self, sizes: Sequence[int], tasks: Sequence[str], opts: PipelineOptions):
        self._sizes = [int(s) for s in sizes]
        self._tasks = list(tasks)
        self._opts = opts
        self._host, self._hosts = _host(opts)
        self._b = opts.batch_size
        self._g = opts.batch_size * self._hosts
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
        self._total = int(self._offsets[-1])
        if self._total == 0:
            raise ValueError("no records to read")
        self._epochs: dict[int, np.ndarray] = {}  # epoch -> (N, 2) [global index, visit]
        self._epoch_len_cache: list[int] = []
        self._lock = threading.Lock()  # grain reads slots from several threads
        if opts.stage == "eval":
            # One pass; the last global batch is completed with filler slots (valid = False).
            self._len = (self._total + self._g - 1) // self._g * self._b
        elif opts.num_epochs is None:
            if self._epoch_len(0) == 0:
                raise ValueError(
                    f"{self._total} records give no full global batch of {self._g} "
                    f"({self._b} per host x {self._hosts} hosts)"
                )
            self._len = sys.maxsize
        else:
            glob = sum(self._epoch_len(e) for e in range(opts.num_epochs))
            self._len = glob // self._hosts
            if self._len == 0:
                raise ValueError(
                    f"{self._total} records give no full global batch of {self._g} "
                    f"({self._b} per host x {self._hosts} hosts)"
                )

    # -- per-epoch global order (array of global record indices) ---------------------------------

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([int(self._opts.seed) & 0xFFFFFFFF, epoch, stream, 0x5EED])

    def _perm(self, n: int, epoch: int, stream: int) -> np.ndarray:
        if not self._opts.shuffle:
            return np.arange(n, dtype=np.int64)
        return self._rng(epoch, stream).permutation(n).astype(np.int64)

    def _build_epoch(self, epoch: int) -> np.ndarray:
        opts = self._opts
        if opts.stage == "eval":
            order = np.arange(self._total, dtype=np.int64)
        elif opts.mixing == "concat":
            order = self._perm(self._total, epoch, 0)
        elif opts.mixing == "stratified":
            return self._stratified(epoch)
        else:
            return self._drop_partial(self._interleave(epoch))
        return self._drop_partial(np.stack([order, np.zeros_like(order)], axis=1))

    def _drop_partial(self, order: np.ndarray) -> np.ndarray:
        if self._opts.stage == "eval":
            return order
        keep = len(order) // self._g * self._g  # drop the incomplete final global batch
        return order[:keep]

    def _task_pools(self) -> list[np.ndarray]:
        """Global record indices of each task in ``prompts.TASKS`` order."""
        pools = []
        for task in prompts.TASKS:
            idx = [
                np.arange(self._offsets[i], self._offsets[i + 1], dtype=np.int64)
                for i, t in enumerate(self._tasks)
                if t == task
            ]
            pools.append(np.concatenate(idx) if idx else np.zeros(0, np.int64))
        return pools

    def _pool_perm(self, n: int, epoch: int, k: int, visit: int) -> np.ndarray:
        """The order of task pool ``k`` (``n`` records) on its ``visit``-th pass of ``epoch``."""
        return self._perm(n, epoch, 10 + 1000 * k + visit)

    def _pool_walk(self, pool: np.ndarray, n: int, epoch: int, k: int) -> np.ndarray:
        """(n, 2) [global index, visit]: ``pool`` in seeded orders, reshuffled per restart."""
        passes = -(-n // len(pool)) if n else 0
        walk = [
            np.stack([pool[self._pool_perm(len(pool), epoch, k, v)], np.full(len(pool), v)], 1)
            for v in range(passes)
        ]
        return np.concatenate(walk)[:n] if walk else np.zeros((0, 2), np.int64)

    def _stratified(self, epoch: int) -> np.ndarray:
        """Global batches of ``round(p_iqa * G)`` IQA and ``G - that`` IAA records each."""
        pools = self._task_pools()
        n_iqa = int(round(self._opts.p_iqa * self._g))
        per_batch = [n_iqa, self._g - n_iqa]
        for k, task in enumerate(prompts.TASKS):
            if per_batch[k] and not len(pools[k]):
                raise ValueError(
                    f"stratified mixing: p_iqa {self._opts.p_iqa} asks for {per_batch[k]} "
                    f"{task} records per batch of {self._g}, but there are no {task} records"
                )
        used = [k for k in range(2) if per_batch[k]]
        if self._opts.stopping == "first_exhausted":  # no pool restarts
            n_batches = min(len(pools[k]) // per_batch[k] for k in used)
        else:  # every pool seen once: the smaller one restarts (reshuffled) to fill the batches
            n_batches = max(-(-len(pools[k]) // per_batch[k]) for k in used)
        walks = [self._pool_walk(pools[k], per_batch[k] * n_batches, epoch, k) for k in range(2)]
        rng = self._rng(epoch, 2)
        batches = []
        for b in range(n_batches):
            rows = np.concatenate(
                [walks[k][b * per_batch[k] : (b + 1) * per_batch[k]] for k in range(2)]
            )
            batches.append(rows[self._perm_rng(rng, len(rows))])
        return np.concatenate(batches) if batches else np.zeros((0, 2), np.int64)

    def _perm_rng(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.permutation(n) if self._opts.shuffle else np.arange(n)

    def _interleave(self, epoch: int) -> np.ndarray:
        pools = self._task_pools()
        probs = np.array([self._opts.p_iqa, 1.0 - self._opts.p_iqa])
        live = [k for k in range(2) if len(pools[k]) and probs[k] > 0]
        if not live:
            raise ValueError("interleave: no task pool with records and positive probability")
        probs = probs[live] / probs[live].sum()
        rng = self._rng(epoch, 1)
        cursor = [0] * len(live)
        restarts = [0] * len(live)
        perms = [self._pool_perm(len(pools[k]), epoch, k, 0) for k in live]
        exhausted = [False] * len(live)
        out: list[tuple[int, int]] = []
        # Draw choices in chunks; each slot is one Bernoulli/categorical choice (spec §6.1).
        while True:
            for c in rng.choice(len(live), size=4096, p=probs):
                k = live[c]
                out.append((int(pools[k][perms[c][cursor[c]]]), restarts[c]))
                cursor[c] += 1
                if cursor[c] == len(pools[k]):
                    exhausted[c] = True
                    restarts[c] += 1
                    cursor[c] = 0
                    perms[c] = self._pool_perm(len(pools[k]), epoch, k, restarts[c])
                    done = all(exhausted) if self._opts.stopping == "all_exhausted" else True
                    if done:
                        return np.asarray(out, np.int64).reshape(-1, 2)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _epoch(self, epoch: int) -> np.ndarray:
        with self._lock:
            order = self._epochs.get(epoch)
            if order is None:
                if len(self._epochs) > 4:  # bounded memory on infinite runs
                    self._epochs.pop(min(self._epochs))
                order = self._epochs[epoch] = self._build_epoch(epoch)
            return order

    def _epoch_len(self, epoch: int) -> int:
        while len(self._epoch_len_cache) <= epoch:
            nxt = len(self._epoch_len_cache)
            n = len(self._epoch(nxt))
            with self._lock:
                if len(self._epoch_len_cache) == nxt:  # another thread may have added it
                    self._epoch_len_cache.append(n)
        return self._epoch_len_cache[epoch]

    # -- Sequence protocol ------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, k: int) -> tuple[int, int, int, int, int]:
        if not 0 <= k < self._len:
            raise IndexError(k)
        glob = (k // self._b) * self._g + self._host * self._b + k % self._b
        if self._opts.stage == "eval":
            if glob >= self._total:
                return (-1, 0, 0, glob, 0)
            epoch, pos = 0, glob
        else:
            epoch, pos = 0, glob
            while pos >= self._epoch_len(epoch):
                pos -= self._epoch_len(epoch)
                epoch += 1
        gidx, visit = (int(x) for x in self._epoch(epoch)[pos])
        src = int(np.searchsorted(self._offsets, gidx, side="right") - 1)
        return (src, gidx - int(self._offsets[src]), epoch, glob, visit)

    def num_batches(self) -> int:
        """Batches this host reads in the whole run (-1 when it repeats forever)."""
        return self._len // self._b if self._len != sys.maxsize else -1


# --------------------------------------------------------------------------------------------
# Record -> example (runs in grain workers)


class LoadExample:
    """Picklable map function: schedule slot -> example dict, or a bad-record marker.

    The tokenizer is (re)loaded lazily in each process rather than pickled with the function.
    """

    def __init__(self, sources: Sequence[Source], opts: PipelineOptions):
        self._sources = list(sources)
        self._opts = opts
        self._tok = None
        self._template = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tok"] = None
        return state

    def _tokenizer(self):
        if self._tok is None:
            from tatar_jax.data.tokenizer import load_tokenizer

            tok = load_tokenizer(self._opts.tokenizer_dir)
            # Template first: another map thread may see _tok set and read _template at once.
            self._template = tok.chat_template if self._opts.use_chat_template else None
            self._tok = tok
        return self._tok

    def _image(self, rec: Mapping[str, Any], where: str):
        from tatar_jax.data import image as image_mod

        if rec.get("image_bytes") is not None:
            pil = image_mod.load_image(rec["image_bytes"], name=str(rec.get("image") or where))
        else:
            pil = image_mod.load_image(rec["image"])
        return image_mod.preprocess_image(
            pil,
            min_pixels=self._opts.min_pixels,
            max_pixels=self._opts.max_pixels,
            upscale_min_side=self._opts.upscale_min_side or None,
        )

    def __call__(self, slot: tuple[int, int, int, int, int]) -> dict[str, Any]:
        src_i, rec_i, epoch, glob, visit = (int(x) for x in slot)
        filler = src_i < 0
        src = self._sources[0 if filler else src_i]
        rec = src.records[0 if filler else rec_i]
        row = rec.get("row_id", rec_i)
        manifest = f" ({rec['source']})" if rec.get("source") else ""
        where = f"dataset {src.name!r}{manifest} row {row} (image {rec.get('image', '<bytes>')!r})"
        try:
            tok = self._tokenizer()
            pv, thw = self._image(rec, where)
            if "gt_100" in rec:
                gt = float(rec["gt_100"])
            elif self._opts.stage == "eval":
                gt = float("nan")  # unlabeled images can be scored
            else:
                raise ex.ExampleError("record has no 'gt_100' (training needs a label)")
            common = dict(
                gt_100=gt,
                dataset=src.name,
                image_path=str(rec.get("image", "")),
                row_id=int(row),
                variant=self._opts.prompt_variant,
                chat_template=self._template,
            )
            if self._opts.stage == "sft":
                if "target" not in rec:
                    raise ex.ExampleError("record has no 'target' (SFT rationale)")
                e = ex.make_sft_example(
                    tok,
                    pv,
                    thw,
                    src.task,
                    rec["target"],
                    p_drop_think=dict(self._opts.p_drop_think),
                    seed=self._opts.seed,
                    epoch=epoch,
                    visit=visit,
                    **common,
                )
            else:
                e = ex.make_prompt_example(tok, pv, thw, src.task, **common)
            longest = max(self._opts.seq_buckets)
            if len(e["input_ids"]) > longest:
                raise ex.ExampleError(
                    f"{len(e['input_ids'])} tokens exceed the largest sequence bucket {longest} "
                    "(raise data.seq_buckets or lower max_pixels)"
                )
        except Exception as err:  # noqa: BLE001 - every failure is reported with its record
            reason = f"{type(err).__name__}: {err}"
            if self._opts.bad_record == "error":
                raise BadRecordError(f"{where}: {reason}") from err
            return {
                "_bad": True, "where": where, "reason": reason, "slot": glob, "filler": filler,
                "dataset": src.name, "row": int(row),
            }  # fmt: skip
        e["epoch"] = np.int32(epoch)
        e["valid"] = not filler
        return e


# --------------------------------------------------------------------------------------------
# Batching (main process)


def _fingerprint(sources: Sequence[Source], opts: PipelineOptions) -> str:
    """What a saved iterator state is only valid for: record counts and the reading order."""
    import hashlib

    order = dataclasses.asdict(opts)
    # These may change between runs without changing the data order (a run stopped by a bad
    # record may resume with bad_record="skip").
    for k in ("worker_count", "worker_buffer_size", "read_threads", "tokenizer_dir",
              "bad_record", "max_skip_fraction", "vision"):  # fmt: skip
        order.pop(k)
    key = json.dumps(
        [[s.name, s.task, len(s.records)] for s in sources] + [order], sort_keys=True, default=str
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class _SkipLedger:
    """Skipped records per dataset: logs each once, counts them, enforces the skip budget.

    ``rows_skipped_by_loader`` (manifest rows the loader rejected) count against the same
    budget: ``max_skip_fraction`` of a dataset's manifest rows (of this host's share of them).
    """

    def __init__(self, sources: Sequence[Source], opts: PipelineOptions, hosts: int):
        self._fraction = opts.max_skip_fraction
        self._hosts = hosts
        self._size = {s.name: len(s.records) + s.num_skipped_rows for s in sources}
        self._loader = {s.name: s.num_skipped_rows for s in sources}
        self._failed: dict[str, set[int]] = {s.name: set() for s in sources}
        self.num_failed = 0  # failed reads, repeats included

    def log_loader_rows(self, sources: Sequence[Source]) -> None:
        for s in sources:
            for bad in s.skipped_rows:
                logging.warning("skipped (manifest) %s: %s", s.name, bad)
            if s.num_skipped_rows:
                self._check(s.name, f"the manifest loader rejected {s.num_skipped_rows} rows")

    def note(self, bad: Mapping[str, Any]) -> None:
        """One failed read (``LoadExample``'s marker): log and count it if it is new."""
        self.num_failed += 1
        rows = self._failed[bad["dataset"]]
        if bad["row"] in rows:
            return  # the same record again (a later epoch): counted and logged once
        rows.add(bad["row"])
        logging.warning("skipped %s: %s", bad["where"], bad["reason"])
        self._check(bad["dataset"], f"last: {bad['where']}: {bad['reason']}")

    def counts(self) -> dict[str, int]:
        return {k: self._loader[k] + len(v) for k, v in self._failed.items()}

    def _check(self, name: str, detail: str) -> None:
        n, size = self.counts()[name], self._size[name]
        share = size / self._hosts
        if n > self._fraction * share:
            whose = f"{share:.0f} (this host's share of {size})" if self._hosts > 1 else size
            raise TooManySkippedError(
                f"dataset {name!r}: {n} of {whose} records skipped ({n / share:.1%}), more than "
                f"data.max_skip_fraction = {self._fraction:g}; {detail}. Fix the data (see the "
                "'skipped' log lines) or raise data.max_skip_fraction"
            )

    def state(self) -> dict[str, Any]:
        return {"failed": {k: sorted(v) for k, v in self._failed.items()}, "n": self.num_failed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for k, rows in state.get("failed", {}).items():
            self._failed[k] = {int(r) for r in rows}
        self.num_failed = int(state.get("n", 0))


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent, ds: _BatchDataset):
        super().__init__(parent)
        self._opts = ds.opts
        self._ds = ds
        self._ledger = _SkipLedger(ds.sources, ds.opts, ds.hosts)
        self._ledger.log_loader_rows(ds.sources)
        self._num_batches = 0
        self._template: dict[str, Any] | None = None  # a good example, for padding rows

    def _rows(self) -> tuple[list[dict], list[dict]]:
        """Up to ``batch_size`` examples (bad records replaced by the next ones) and the
        records skipped on the way."""
        rows: list[dict] = []
        skipped: list[dict] = []
        while len(rows) < self._opts.batch_size:
            try:
                x = next(self._parent)
            except StopIteration:
                break
            if not x.get("_bad"):
                rows.append(x)
            elif x["filler"]:
                continue  # an evaluation filler is padding either way
            else:
                skipped.append({k: x[k] for k in ("where", "reason", "slot")})
                self._ledger.note(x)
                if not rows and len(skipped) > self._ds.num_records:  # (max_skip_fraction = 1)
                    raise TooManySkippedError(f"a whole pass read no record: {x['reason']}")
        return rows, skipped

    def __next__(self) -> batch_mod.Batch:
        rows, skipped = self._rows()
        if rows:
            self._template = rows[0]
        elif self._opts.stage == "eval" or self._num_batches >= self._ds.target:
            raise StopIteration
        elif self._template is None:
            raise TooManySkippedError(
                f"this host's records ran out at batch {self._num_batches} of "
                f"{self._ds.target} with no readable record ({self._ledger.num_failed} skipped)"
            )
        else:  # the host's order ran out early (skips): padding keeps hosts in step
            rows = [dict(self._template, valid=False)]
        batch = ex.collate(
            rows,
            pad_id=self._ds.pad_id,
            seq_buckets=self._opts.seq_buckets,
            patch_buckets=self._opts.patch_buckets,
            padding_side=self._opts.side,
            batch_size=self._opts.batch_size,
            vision_config=self._opts.vision,
        )
        self._num_batches += 1
        stats = batch_mod.ReadStats(
            num_skipped=self._ledger.num_failed,
            num_skipped_rows=sum(s.num_skipped_rows for s in self._ds.sources),
            skipped_by_dataset=tuple(self._ledger.counts().items()),
            skipped=tuple(batch_mod.SkippedRead(**s) for s in skipped),
            batch_index=self._num_batches - 1,
        )
        return batch.replace(stats=stats)

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "skipped": self._ledger.state(),
            "num_batches": self._num_batches,
            "fingerprint": self._ds.fingerprint,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self._ds.fingerprint:
            raise ValueError(
                "iterator state was saved for different data or reading options "
                f"(fingerprint {state.get('fingerprint')} != {self._ds.fingerprint}); "
                "restore with the same sources, batch size, seed, mixing and hosts"
            )
        self._parent.set_state(state["parent"])
        self._ledger.set_state(state.get("skipped", {}))
        self._num_batches = int(state["num_batches"])


class _BatchDataset(grain.IterDataset):
    """Batches of ``parent``'s examples; ``target``: batches every host yields (a finite
    training order is padded up to it; unbounded for evaluation and infinite orders)."""

    def __init__(self, parent: grain.IterDataset, sources: Sequence[Source],
                 opts: PipelineOptions, pad_id: int, target: int):  # fmt: skip
        super().__init__(parent)
        self.sources = list(sources)
        self.opts = opts
        self.pad_id = pad_id
        self.target = target
        self.hosts = _host(opts)[1]
        self.fingerprint = _fingerprint(sources, opts)
        self.num_records = sum(len(s.records) for s in sources)

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"TatarBatch(batch_size={self.opts.batch_size}, stage={self.opts.stage})"


def make_dataset(sources: Sequence[Source], opts: PipelineOptions) -> grain.IterDataset:
    """The pipeline as a grain ``IterDataset`` of batches (see module doc).

    ``iter(ds)`` gives a ``DatasetIterator`` with ``get_state``/``set_state``; close it (or
    let it be collected) to stop worker processes.
    """
    if not sources:
        raise ValueError("no sources")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate source names: {names}")
    sched = Schedule([len(s.records) for s in sources], [s.task for s in sources], opts)
    ds = grain.MapDataset.source(sched).map(LoadExample(sources, opts))
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, opts.read_threads), prefetch_buffer_size=8)
    )
    if opts.worker_count > 0:
        from absl import flags

        # grain's workers read absl flags; outside an absl app (tests, notebooks) they are
        # unparsed, so take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=opts.worker_count, per_worker_buffer_size=opts.worker_buffer_size
            )
        )
    from tatar_jax.data.tokenizer import load_tokenizer

    pad_id = load_tokenizer(opts.tokenizer_dir).pad_id
    n = sched.num_batches()
    target = n if opts.stage != "eval" and n >= 0 else sys.maxsize
    return _BatchDataset(it_ds, sources, opts, pad_id, target)


def num_batches(sources: Sequence[Source], opts: PipelineOptions) -> int:
    """Batches of the whole run, the same on every host (``-1`` when it repeats forever).

    With ``num_epochs=1`` this is the number of steps per epoch (``all_exhausted`` interleave
    epochs differ slightly in length from epoch to epoch).
    """
    sched = Schedule([len(s.records) for s in sources], [s.task for s in sources], opts)
    return sched.num_batches()


def options_from_config(data_cfg: Any, stage: str, batch_size: int, **overrides) -> PipelineOptions:
    """``PipelineOptions`` from a ``configs/common.py:data_config`` block (+ keyword overrides)."""

    def get(name: str) -> Any:
        # Strict: a renamed or missing field is an error, never a silent default.
        if name not in data_cfg:
            raise KeyError(f"data config has no field {name!r}")
        return data_cfg[name]

    kw = dict(
        stage=stage,
        batch_size=batch_size,
        seq_buckets=tuple(get("seq_buckets")),
        patch_buckets=(tuple(get("patch_buckets")) or None),
        mixing=get("mixing"),
        p_iqa=float(get("p_iqa")),
        stopping=get("stopping"),
        num_epochs=get("num_epochs"),
        shuffle=bool(get("shuffle")),
        seed=int(get("seed")),
        worker_count=int(get("worker_count")),
        worker_buffer_size=int(get("prefetch")),
        bad_record=get("bad_record"),
        max_skip_fraction=float(get("max_skip_fraction")),
        min_pixels=int(get("min_pixels")),
        max_pixels=int(get("max_pixels")),
        prompt_variant=get("prompt_variant"),
        p_drop_think=dict(get("p_drop_think")),
    )
    if stage == "eval":
        kw.update(num_epochs=1, shuffle=False, mixing="concat")
    kw.update(overrides)
    return PipelineOptions(**kw)
