"""``sslp embed RUN_DIR SOURCE --out PATH``: a run's embeddings of a whole corpus, by Ray Data batch inference.

    read SOURCE -> decode (bad records skipped and counted) -> map_batches(EmbedBatches, actor pool)
    -> write_parquet(PATH): one row per good record, ``id`` (string) and ``embedding``
       (fixed-size list of float32, the run's embedding width)

The driver loads the run (``ssl_platform.load``) and puts it in the object store; each actor
takes it from there once (so no node but the driver's needs to see the run directory) and
embeds batch after batch with
the same functions as ``Pretrained.embed_*`` and the evaluations: an image model embeds images,
CLIP images or texts (``--modality``), BERT/GPT texts, CPC audio. An actor takes a GPU when the
cluster has GPUs, else a share of the CPUs that leaves one to the read and decode stages.

Nothing is collected on the driver: Ray Data's streaming executor pulls blocks through the
stages as the writer drains them, so a corpus many times the object store's size passes through
with bounded memory (blocks may spill to disk under pressure; that is not a failure).

What names a record (``id``): the file path (image folders, audio), ``file#row-hash`` for images
in parquet without a path column, ``NAME/SPLIT/000042`` for in-memory built-in corpora, and the
document's source and a hash of its text for text corpora (``python-docs``: ``topic#hash``,
``python-stdlib``: ``module#hash``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ssl_platform.command import EXIT_USAGE, add_ray_args, add_verbose_arg, on_ray, quiet_console

MODALITY_CHOICES = ("images", "texts", "audio")


def add_parser(sub) -> None:
    from ssl_platform.config import CORPUS_FORMATS

    p = sub.add_parser(
        "embed", help="embed a corpus with a run's encoder (Ray Data batch inference) into parquet",
        description="Embed every record of SOURCE with the encoder of RUN_DIR: Ray Data reads and decodes the corpus "
                    "(bad records are skipped and counted), an actor pool holding the model embeds it (GPUs when "
                    "present), and the embeddings stream into parquet at --out: columns id and embedding.")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory or one of its checkpoint_* dirs")
    p.add_argument("source", metavar="SOURCE", help="a path or URI, or a built-in corpus name")
    p.add_argument("--out", required=True, help="output folder of parquet files (must not exist yet)")
    p.add_argument("--modality", choices=MODALITY_CHOICES, default=None,
                   help="what to embed (default: the run's first; CLIP: images or texts)")
    p.add_argument("--batch-size", type=int, default=256, help="records per model call (default 256)")
    p.add_argument("--actors", type=int, default=1, help="model replicas embedding in parallel (default 1)")
    p.add_argument("--format", default="auto", choices=CORPUS_FORMATS, help="file format (auto: from the path)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record, naming it")
    add_ray_args(p)
    add_verbose_arg(p, "OUT.ray.log, beside the output folder")


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.actors < 1:
        print("sslp: embed: --batch-size and --actors must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
        print(f"sslp: embed: --out {args.out} already exists; give a new path (files would mix with the old ones)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        from ssl_platform.pretrained import load

        pretrained = load(args.run)
        modality = pick_modality(pretrained, args.modality)
    except (FileNotFoundError, ValueError) as e:
        print(f"sslp: embed: {e}", file=sys.stderr)
        return EXIT_USAGE

    def work() -> None:
        from ssl_platform.data.skips import format_summary
        from ssl_platform.train.session import DataError

        try:
            summary = embed(pretrained, args.source, Path(args.out), modality=modality, batch_size=args.batch_size,
                            actors=args.actors, fmt=args.format, strict=args.strict)
        except (ValueError, FileNotFoundError) as e:
            raise DataError(str(e)) from None
        print(f"{summary.rows} embeddings written ({modality}, {summary.dim} dims); "
              f"{format_summary(summary.skipped)}", flush=True)
        print(f"output: {summary.out}", flush=True)

    return on_ray(args, work, interrupted=f"interrupted; {args.out} holds part of the embeddings",
                  console=quiet_console(args, log_path(Path(args.out))))


def log_path(out: Path) -> Path:
    """Ray's log of an embed: beside the output folder, whose files are all parquet (readers of
    the folder take every file in it)."""
    out = out.resolve()
    return out.with_name(out.name + ".ray.log")


def pick_modality(pretrained, modality: str | None) -> str:
    """The modality to embed: the one asked for if the run has an encoder for it, else its first."""
    if modality is None:
        return pretrained.modalities[0]
    if modality not in pretrained.modalities:
        raise ValueError(f"--modality {modality}: this {pretrained.kind} model ({pretrained.cfg.method.name}) "
                         f"embeds {' or '.join(pretrained.modalities)}")
    return modality


@dataclass
class EmbedSummary:
    rows: int
    dim: int
    out: Path
    skipped: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- sources


def image_rows(pretrained, source: str, reporter, fmt: str):
    """(Dataset of {"image": uint8 (C, S, S), ...}, id column) at the run's size and channels."""
    import numpy as np

    from ssl_platform.data.builtin import IMAGE_CORPORA, load_image_corpus
    from ssl_platform.data.images import read_image_corpus, split_dataset

    size, channels = pretrained.cfg.data.image_size, pretrained.derived["in_channels"]
    cfg = pretrained.cfg
    splits = None
    if source in IMAGE_CORPORA:
        splits = load_image_corpus(source, size, cfg.data.val_fraction, cfg.train.seed)
        splits = {name: split.images for name, split in splits.items()}
    else:
        from ssl_platform.data.digit_captions import BUILTIN_CAPTION_CORPORA

        if source in BUILTIN_CAPTION_CORPORA:
            splits = {name: split.images for name, split in
                      BUILTIN_CAPTION_CORPORA[source](size, cfg.data.val_fraction, cfg.train.seed).items()}
    if splits is not None:
        parts = []
        for name, images in splits.items():
            if images.shape[1] == 1 and channels == 3:
                images = np.repeat(images, 3, axis=1)  # a grayscale corpus through an RGB encoder
            parts.append(split_dataset(images, f"{source}/{name}"))
        return parts[0].union(*parts[1:]), "path"
    corpus = read_image_corpus(source, size=size, channels=channels, reporter=reporter, fmt=fmt)
    return corpus.dataset, "path"


def text_rows(pretrained, source: str, reporter, fmt: str):
    """(Dataset of {"text": str, ...}, id column): a text corpus, or a built-in caption corpus's captions."""
    from ssl_platform.data.digit_captions import BUILTIN_CAPTION_CORPORA
    from ssl_platform.data.text import open_text_corpus

    cfg = pretrained.cfg
    if source in BUILTIN_CAPTION_CORPORA:
        import ray.data

        rows = [{"text": str(c), "id": f"{source}/{name}/{i:06d}"}
                for name, split in BUILTIN_CAPTION_CORPORA[source](cfg.data.image_size, cfg.data.val_fraction,
                                                                   cfg.train.seed).items()
                for i, c in enumerate(split.captions)]
        return ray.data.from_items(rows, override_num_blocks=8), "id"
    ds = open_text_corpus(source, reporter=reporter, unit=cfg.data.text_unit, text_field=cfg.data.text_field, fmt=fmt)
    return ds.map_batches(text_ids, batch_format="numpy"), "id"


def text_ids(batch: dict) -> dict:
    """``SOURCE#HASH``: a file holds many documents, and a streamed row has no global index; a
    hash of the text names the document stably across runs."""
    import hashlib

    import numpy as np

    ids = [f"{s}#{hashlib.sha1(str(t).encode()).hexdigest()[:12]}"
           for s, t in zip(batch["source"], batch["text"], strict=True)]
    return {**batch, "id": np.array(ids, dtype=object)}


def audio_rows(pretrained, source: str, reporter, fmt: str):
    """(Dataset of {"audio": float32 (T,) at the run's rate, ...}, id column)."""
    from ssl_platform.data.audio import read_audio_corpus

    d = pretrained.cfg.data
    if source == "spoken-digits":
        from ssl_platform.data.spoken_digits import audio_to_dataset, load_spoken_digits

        return audio_to_dataset(load_spoken_digits(d.sample_rate)), "path"
    return read_audio_corpus(source, sample_rate=d.sample_rate, reporter=reporter, max_seconds=d.max_audio_seconds,
                             fmt=fmt), "path"


READERS = {"images": image_rows, "texts": text_rows, "audio": audio_rows}


# ----------------------------------------------------------------------------- inference


class EmbedBatches:
    """``map_batches`` actor: loads the run once, then turns decoded batches into output rows.

    Returns a pyarrow table per batch: ``id`` (string) and ``embedding`` (fixed-size list of
    float32), so the parquet files carry a plain list column any reader takes.
    """

    def __init__(self, model, modality: str, id_column: str, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)
        # The driver's loaded run, from the object store (one copy per node): the actors need not
        # see the run directory, which on a cluster may live on the driver's machine only.
        model = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.modality, self.id_column = modality, id_column

    def embeddings(self, batch: dict):
        import numpy as np
        import torch

        from ssl_platform.evaluate.image import embed_images

        m = self.model
        if self.modality == "images":  # decoded already at the run's size: the evaluation encode
            images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"])).to(m.device)
            with torch.no_grad():
                return embed_images(m.method, {"image": images}).float().cpu().numpy()
        if self.modality == "texts":
            return m.embed_texts([str(t) for t in batch["text"]])
        return m.embed_audio(list(batch["audio"]), m.cfg.data.sample_rate)

    def __call__(self, batch: dict):
        import numpy as np
        import pyarrow as pa

        ids = [str(i) for i in batch[self.id_column]]
        features = np.zeros((0, self.model.dim), np.float32) if not ids else self.embeddings(batch)
        features = np.ascontiguousarray(features, dtype=np.float32)  # (B, D)
        return pa.table({"id": pa.array(ids, pa.string()),
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)),
                                                                        features.shape[1])})


def embed(pretrained, source: str, out: Path, *, modality: str | None = None, batch_size: int = 256, actors: int = 1,
          fmt: str = "auto", strict: bool = False) -> EmbedSummary:
    """Embed every good record of ``source`` into parquet files under ``out``. Ray must be running.

    ``pretrained``: ``ssl_platform.load(run)``. Returns the rows written, the width and the
    skipped records by reason.
    """
    import uuid

    import pyarrow.parquet as pq
    import ray
    import ray.data

    from ssl_platform.data.context import configure_data_context
    from ssl_platform.data.skips import SkipReporter, get_or_create_ledger, ledger_name, skip_summary
    from ssl_platform.evaluate.inference import actor_resources
    from ssl_platform.train import console

    modality = pick_modality(pretrained, modality)
    configure_data_context(progress_bars=console.live(), per_operator=True)  # bars on a terminal, never INFO lines
    name = ledger_name(f"embed-{pretrained.cfg.name}-{uuid.uuid4().hex[:8]}")  # concurrent embeds count apart
    ledger = get_or_create_ledger(name)
    try:
        ds, id_column = READERS[modality](pretrained, source, SkipReporter(name, strict), fmt)
        cpus, gpus = actor_resources(actors, use_gpu=True)  # a GPU per actor wherever the cluster has GPUs
        rows = ds.map_batches(
            EmbedBatches, fn_constructor_kwargs={"model": ray.put(pretrained.to("cpu")),
                                                 "modality": modality, "id_column": id_column,
                                                 "threads": max(1, int(cpus))},
            compute=ray.data.ActorPoolStrategy(size=actors), batch_size=batch_size, batch_format="numpy",
            num_cpus=cpus, num_gpus=gpus)
        rows.write_parquet(str(out))
        skipped = skip_summary(ledger)
    finally:
        ray.kill(ledger)
    files = sorted(Path(out).glob("*.parquet")) if Path(out).is_dir() else []
    written = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return EmbedSummary(written, pretrained.dim, Path(out), skipped)
