"""``sslp export RUN_DIR --out DIR``: a run's encoder as files that load without this platform.

DIR gets:

- ``model.safetensors``: the encoder's weights only (no projector, predictor, target network,
  LM/MLM head or optimizer state); for CLIP both open_clip towers and the logit scale;
- ``config.json``: the architecture and the preprocessing (image size, channels, mean/std;
  tokenizer kind, special ids and length; sample rate and normalisation) and how the
  embedding is read off the encoder;
- the tokenizer: a BERT/GPT run's trained HF ``tokenizers`` file in ``tokenizer/``; CLIP uses
  the BPE vocabulary bundled with open_clip (``open_clip.tokenize``), nothing to copy;
- ``modeling.py`` for architectures defined in ``ssl_models`` (ResNetSmall and the torchvision
  ResNet wrapper, the BERT/GPT transformer, the CPC encoder): the ``ssl_models`` source modules
  themselves, copied verbatim at export time, so the export can never drift from the code that
  trained it. This works because those modules import only torch (and torchvision): the export
  checks it and refuses a module that has grown another import (CLIP needs no modeling.py: its
  towers are ``open_clip.CLIP``);
- ``README.md`` with a short snippet that loads it all with plain torch (+ torchvision,
  open_clip, tokenizers, safetensors) and embeds inputs exactly as ``ssl_platform.load`` does.
  The tests run that very snippet in a fresh interpreter that never imports this platform.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPORT_FORMAT = "ssl-platform-export/1"
WEIGHTS_FILE, CONFIG_FILE, MODELING_FILE, README_FILE, TOKENIZER_DIR = (
    "model.safetensors", "config.json", "modeling.py", "README.md", "tokenizer")
# Top-level imports a verbatim modeling module may have: it must run with torch (+ torchvision) alone.
ALLOWED_IMPORTS = {"__future__", "collections", "dataclasses", "inspect", "math", "typing", "torch", "torchvision"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a run's encoder as safetensors + config + tokenizer, loadable without ssl-platform",
        description="Export the encoder of RUN_DIR's newest (or finished) checkpoint, or of the checkpoint given, "
                    "into DIR: model.safetensors (encoder weights only), config.json (architecture and "
                    "preprocessing), the tokenizer, modeling.py (for ssl_models architectures: their source, "
                    "verbatim) and a README.md whose snippet loads them with plain torch.")
    p.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or one of its checkpoint_* dirs")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="write into DIR even if it is not empty (files are replaced)")


def main(args: argparse.Namespace) -> int:
    try:
        out = export(args.target, args.out, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"sslp: export: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


@dataclass
class Export:
    """What one kind of run writes: weights, config entries, modeling sources and the README snippet."""

    weights: dict[str, Any]  # name -> tensor, the encoder's state only
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    embedding: str  # how the embedding is read off the encoder, in words
    snippet: str  # the README's Python code
    modeling: tuple[str, ...] = ()  # ssl_models modules copied verbatim into modeling.py
    requires: str = "torch safetensors"
    files: dict[str, Path] = field(default_factory=dict)  # extra directories to copy: name in DIR -> source


def export(target: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the export of ``target`` (a run or checkpoint directory) into ``out``; returns ``out``."""
    from ssl_platform.pretrained import load

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder or pass --force to "
                              f"write into it")
    pretrained = load(target)
    spec = EXPORTERS[pretrained.kind](pretrained)
    out.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in spec.weights.items()}, str(out / WEIGHTS_FILE))
    config = {
        "format": EXPORT_FORMAT, "method": pretrained.cfg.method.name, "kind": pretrained.kind,
        "run": pretrained.cfg.name, "checkpoint": str(pretrained.checkpoint), "embedding_dim": pretrained.dim,
        "embedding": spec.embedding, "architecture": spec.architecture, "preprocessing": spec.preprocessing,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if spec.modeling:
        (out / MODELING_FILE).write_text(modeling_source(spec.modeling))
    for name, source in spec.files.items():
        if (out / name).exists():
            shutil.rmtree(out / name)
        shutil.copytree(source, out / name)
    (out / README_FILE).write_text(readme(pretrained, spec))
    return out


# ---------------------------------------------------------------------------------------------
# modeling.py: ssl_models source, verbatim


def modeling_source(modules: tuple[str, ...]) -> str:
    """The source of the ``ssl_models`` modules, concatenated into one file that needs only torch.

    Each module is copied as it is, except that ``from __future__ import annotations`` must be
    the file's first statement, so later modules' copies of that line are dropped (the first
    one already applies to the whole file). ValueError if a module imports anything outside
    :data:`ALLOWED_IMPORTS` (an ``ssl_models`` import would make the file unusable alone).
    """
    import importlib

    parts = [("# Generated by `sslp export` from the ssl_models modules named below, copied verbatim, so this\n"
              "# file is the code the encoder was trained with. Needs only torch (and torchvision).\n")]
    for i, name in enumerate(modules):
        path = Path(importlib.import_module(name).__file__)
        source = path.read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            roots = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [r for r in roots if r.split(".")[0] not in ALLOWED_IMPORTS]
            if bad:
                raise ValueError(f"{name} imports {bad[0]}, so it cannot be exported as a standalone modeling.py; "
                                 f"keep {name} to torch-only imports (allowed: {sorted(ALLOWED_IMPORTS)})")
        if i:
            source = source.replace("from __future__ import annotations\n", "", 1)
        parts.append(f"\n# {'=' * 90}\n# {name} (verbatim)\n# {'=' * 90}\n\n{source}")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# One exporter per kind


def _image_preprocessing(pretrained) -> dict[str, Any]:
    from ssl_platform.data.transforms import MEAN, STD

    return {"image_size": pretrained.cfg.data.image_size, "channels": pretrained.derived["in_channels"],
            "scale": 255.0, "mean": MEAN, "std": STD,
            "resize": "centre square crop, then one antialiased resize to image_size (uint8)",
            "input": "float (N, channels, image_size, image_size) = (uint8 / scale - mean) / std"}


IMAGE_SNIPPET = '''\
import json
import sys

import torch
from safetensors.torch import load_file

directory = "."  # this export folder
sys.path.insert(0, directory)
import modeling  # ssl_models/encoders.py, verbatim: torch + torchvision only

config = json.load(open(f"{directory}/config.json"))
arch, pre = config["architecture"], config["preprocessing"]
encoder = modeling.build_image_encoder(arch["encoder"], arch["in_channels"], strict=False, **arch["encoder_kwargs"])
encoder.load_state_dict(load_file(f"{directory}/model.safetensors"))
encoder.eval()


def embed_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, S, S) images, centre-cropped and resized to S = pre["image_size"] -> (N, D)."""
    x = (images.float() / pre["scale"] - pre["mean"]) / pre["std"]
    with torch.no_grad():
        return encoder(x)


size = pre["image_size"]
print(embed_images(torch.zeros(2, pre["channels"], size, size, dtype=torch.uint8)).shape)
'''


def _image(pretrained) -> Export:
    encoder = pretrained.method.encoder
    # The arguments that rebuild the encoder, as it recorded them (ssl_models.encoders.build_image_encoder).
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in encoder.build_args.items()}
    name, in_channels = options.pop("name"), options.pop("in_channels")
    return Export(
        weights=encoder.state_dict(),
        architecture={"encoder": name, "in_channels": in_channels, "encoder_kwargs": options},
        preprocessing=_image_preprocessing(pretrained),
        embedding="the encoder's pooled features (the projector is not exported)",
        snippet=IMAGE_SNIPPET, modeling=("ssl_models.encoders",), requires="torch torchvision safetensors")


CLIP_SNIPPET = '''\
import json

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

directory = "."  # this export folder
config = json.load(open(f"{directory}/config.json"))
arch, pre = config["architecture"], config["preprocessing"]
model = open_clip.CLIP(arch["embed_dim"], open_clip.CLIPVisionCfg(**arch["vision_cfg"]),
                       open_clip.CLIPTextCfg(**arch["text_cfg"]))
model.load_state_dict(load_file(f"{directory}/model.safetensors"))
model.eval()


def embed_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, S, S) images, centre-cropped and resized to S -> L2-normalised (N, E)."""
    x = (images.float() / pre["scale"] - pre["mean"]) / pre["std"]
    x = x.expand(-1, 3, -1, -1)  # grayscale runs repeat the channel: the towers take RGB
    with torch.no_grad():
        return F.normalize(model.encode_image(x).float(), dim=-1)


def embed_texts(texts: list[str]) -> torch.Tensor:
    """Captions -> L2-normalised (N, E), tokenised by open_clip's bundled BPE at the run's length."""
    tokens = open_clip.tokenize(texts, context_length=pre["context_length"])
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens).float(), dim=-1)


size = pre["image_size"]
images = embed_images(torch.zeros(2, pre["channels"], size, size, dtype=torch.uint8))
print(images @ embed_texts(["a handwritten 3", "a photo of a dog"]).T)  # cosine similarities
'''


def _jsonable(cfg) -> dict[str, Any]:
    """An open_clip config dataclass as its non-default fields (tuples as lists)."""
    import dataclasses

    default = type(cfg)()
    return {f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(cfg) if (v := getattr(cfg, f.name)) != getattr(default, f.name)}


def _clip_configs(pretrained) -> dict[str, Any]:
    """The arguments ssl_models' CLIP passed to ``open_clip.CLIP``, captured by building it once on
    the meta device (no memory) with the constructor wrapped: the export then cannot disagree
    with how ssl_models maps its settings to open_clip's configs."""
    from unittest import mock

    import open_clip
    import torch

    from ssl_platform import methods

    captured: dict[str, Any] = {}
    real = open_clip.CLIP

    def record(embed_dim, vision_cfg, text_cfg, **kwargs):
        captured.update(embed_dim=embed_dim, vision_cfg=_jsonable(vision_cfg), text_cfg=_jsonable(text_cfg))
        return real(embed_dim, vision_cfg, text_cfg, **kwargs)

    with torch.device("meta"), mock.patch.object(open_clip, "CLIP", record):
        methods.build(pretrained.cfg, **pretrained.derived)
    return captured


def _clip(pretrained) -> Export:
    method = pretrained.method
    return Export(
        weights=method.towers.state_dict(),
        architecture=_clip_configs(pretrained),
        preprocessing={**_image_preprocessing(pretrained), "context_length": method.context_length,
                       "tokenizer": "open_clip.tokenize (the BPE vocabulary bundled with open_clip)",
                       "grayscale": "1-channel images are repeated to 3 channels before the image tower"},
        embedding="each tower's output, L2-normalised (encode_image / encode_text); logit_scale = log(1/T)",
        snippet=CLIP_SNIPPET, requires="torch open_clip_torch safetensors")


TEXT_SNIPPET = '''\
import json
import sys

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

directory = "."  # this export folder
sys.path.insert(0, directory)
import modeling  # ssl_models/transformer.py, verbatim: torch only

config = json.load(open(f"{directory}/config.json"))
arch, pre = config["architecture"], config["preprocessing"]
encoder = modeling.Transformer(modeling.TransformerConfig(**arch["transformer"]))
encoder.load_state_dict(load_file(f"{directory}/model.safetensors"))
encoder.eval()
tokenizer = Tokenizer.from_file(f"{directory}/{pre['tokenizer_file']}")


def embed_texts(texts: list[str]) -> torch.Tensor:
    """Texts -> (N, D): the [CLS] state (BERT) or the mean state over the real tokens (GPT)."""
    rows = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    length = pre["max_len"]
    if pre["cls_id"] is not None:  # BERT: [CLS] tokens [SEP]
        rows = [[pre["cls_id"], *r[:length - 2], pre["sep_id"]] for r in rows]
    else:  # GPT: the tokens (an empty text gets the end-of-text token)
        rows = [r[:length] or [pre["eot_id"]] for r in rows]
    ids = torch.full((len(rows), length), pre["pad_id"], dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    mask = (torch.arange(length) < torch.tensor([len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        hidden = encoder(ids, mask)  # (N, length, D)
    return hidden[:, 0] if pre["pool"] == "cls" else modeling.masked_mean(hidden, mask)


print(embed_texts(["def f(x): return x", "Lists hold items in order."]).shape)
'''


def _text(pretrained) -> Export:
    import dataclasses

    tok, method = pretrained.tokenizer, pretrained.method
    pool = pretrained.spec.pooling  # how the method's embed reads a sequence: the [CLS] state or the mean
    source = pretrained.checkpoint / TOKENIZER_DIR
    if not source.is_dir():
        source = pretrained.checkpoint.parent / TOKENIZER_DIR
    return Export(
        weights=method.transformer.state_dict(),
        architecture={"transformer": dataclasses.asdict(method.config)},
        preprocessing={"tokenizer_kind": tok.kind, "tokenizer_file": f"{TOKENIZER_DIR}/tokenizer.json",
                       "max_len": pretrained.cfg.data.max_len, "cls_id": tok.cls_id, "sep_id": tok.sep_id,
                       "pad_id": tok.pad_id, "eot_id": tok.eot_id, "pool": pool,
                       "sequence": "[CLS] tokens [SEP], padded" if pool == "cls" else "tokens, padded"},
        embedding="[CLS] final hidden state" if pool == "cls" else "mean final hidden state over the real tokens",
        snippet=TEXT_SNIPPET, modeling=("ssl_models.transformer",), requires="torch tokenizers safetensors",
        files={TOKENIZER_DIR: source})


AUDIO_SNIPPET = '''\
import json
import sys

import numpy as np
import torch
from safetensors.torch import load_file

directory = "."  # this export folder
sys.path.insert(0, directory)
import modeling  # ssl_models/audio.py and transformer.py, verbatim: torch only

config = json.load(open(f"{directory}/config.json"))
arch, pre = config["architecture"], config["preprocessing"]
encoder = torch.nn.ModuleDict({"encoder": modeling.ConvFeatureEncoder(**arch["conv"]),
                               "context": modeling.build_context(**arch["context"])})
encoder.load_state_dict(load_file(f"{directory}/model.safetensors"))
encoder.eval()


def embed_audio(clips: list[np.ndarray]) -> torch.Tensor:
    """Mono float clips at pre["sample_rate"] (resample first, e.g. scipy.signal.resample_poly) -> (N, D)."""
    lengths = torch.tensor([len(c) for c in clips])
    audio = torch.zeros(len(clips), int(lengths.max()))
    for i, clip in enumerate(clips):
        x = torch.as_tensor(clip, dtype=torch.float64)
        if pre["normalize"]:  # zero mean, unit variance over the real samples, as in training
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        audio[i, :len(clip)] = x.float()
    with torch.no_grad():
        c = encoder["context"](encoder["encoder"](audio))  # (N, frames, D)
        real = torch.arange(c.shape[1]) < encoder["encoder"].output_length(lengths)[:, None]
        return modeling.masked_mean(c, real)  # padded frames are not pooled


print(embed_audio([np.random.default_rng(0).standard_normal(8000).astype(np.float32)]).shape)
'''


def _audio(pretrained) -> Export:
    from ssl_platform.methods import architecture

    arch, method = architecture(pretrained.cfg), pretrained.method
    weights = {f"{part}.{k}": v for part in ("encoder", "context")
               for k, v in getattr(method, part).state_dict().items()}
    return Export(
        weights=weights,
        architecture={"conv": {"channels": arch["channels"], "kernels": list(arch["kernels"]),
                               "strides": list(arch["strides"]), "sample_rate": pretrained.derived["sample_rate"]},
                      "context": {"kind": arch["context"], "in_dim": arch["channels"], "dim": arch["context_dim"],
                                  "num_layers": arch["context_layers"], "num_heads": arch["num_heads"],
                                  "dropout": arch["dropout"]}},
        preprocessing={"sample_rate": pretrained.cfg.data.sample_rate, "normalize": pretrained.cfg.data.normalize_audio,
                       "mono": True, "min_samples": method.encoder.receptive_field},
        embedding="context features mean-pooled over the clip's real frames (the predictors are not exported)",
        snippet=AUDIO_SNIPPET, modeling=("ssl_models.audio", "ssl_models.transformer"),
        requires="torch numpy safetensors")


EXPORTERS = {"image": _image, "caption": _clip, "text": _text, "audio": _audio}


def readme(pretrained, spec: Export) -> str:
    cfg = pretrained.cfg
    needs = "torch and torchvision" if "torchvision" in spec.requires else "torch"
    modeling = (f"`{MODELING_FILE}` is the source of {', '.join(f'`{m}`' for m in spec.modeling)}, copied verbatim "
                f"by the export: the architecture is defined in this project's `ssl_models` package, so the export "
                f"carries the very code it was trained with instead of a re-implementation that could drift. It "
                f"imports only {needs}.\n\n" if spec.modeling else
                "The architecture is open_clip's own `CLIP`; no model code is needed beyond `open_clip_torch`.\n\n")
    tokenizer = (f"`{TOKENIZER_DIR}/` holds the run's trained HF `tokenizers` file.\n\n" if spec.files else "")
    return (f"# {cfg.name}: {cfg.method.name} encoder\n\n"
            f"Exported by `sslp export` from `{pretrained.checkpoint}`. Embedding: {spec.embedding}, "
            f"{pretrained.dim} wide.\n\n"
            f"- `{WEIGHTS_FILE}`: the encoder's weights only\n"
            f"- `{CONFIG_FILE}`: architecture and preprocessing\n\n"
            f"{modeling}{tokenizer}"
            f"Load it without ssl-platform (`pip install {spec.requires}`), from this folder:\n\n"
            f"```python\n{spec.snippet}```\n\n"
            f"Inside ssl-platform, `ssl_platform.load(RUN_DIR)` gives the same embeddings from raw inputs "
            f"(files, PIL images, strings, waveforms).\n")
