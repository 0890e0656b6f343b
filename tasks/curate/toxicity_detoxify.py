"""The toxicity stage's detoxify backend: find its checkpoint on disk and load it without risk.

detoxify's official checkpoints are GitHub downloads, so they must be on disk beforehand (under
the file names detoxify's own downloader uses, in the torch hub cache, or at a path the config
gives): nothing is downloaded at run time. The file is read with ``torch.load(weights_only=True)``:
tensors and plain containers, no code from the file runs. detoxify's own loader would unpickle it
fully, so it never opens the file (:class:`DetoxifyScorer`).

Kept apart from :mod:`llmflow.tasks.curate.toxicity` (config, scoring, decisions) because none of
it knows the stage: it takes paths and names, and gives a scorer with ``labels`` and ``score``.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
from pathlib import Path
from typing import Any


class DetoxifyCheckpointNotFound(FileNotFoundError):
    """The detoxify backend has no checkpoint on disk (nothing is downloaded at run time)."""


class DetoxifyModelNotFound(FileNotFoundError):
    """The checkpoint's base transformer (config and tokenizer) is neither local nor cached."""


class DetoxifyCheckpointInvalid(ValueError):
    """The file is not a detoxify checkpoint (a dict with its training config and state dict)."""


def torch_hub_checkpoints_dir() -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (detoxify's downloader) keeps its files.

    Same rule as ``torch.hub.get_dir()``, without importing torch for a config check.
    """
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.environ.get("TORCH_HOME", os.path.join(cache, "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def detoxify_download_url(model: str) -> str:
    """detoxify's own download URL for an official model name (read from the installed package)."""
    from detoxify.detoxify import MODEL_URLS  # imports torch and transformers, lazily

    return MODEL_URLS[model]


def find_detoxify_checkpoint(configured: str | None, model: str) -> Path:
    """The checkpoint file to load: ``configured`` if given, else the official ``model``'s file in
    the torch hub cache; or an error saying where it was looked for and how to add it."""
    if configured:
        looked = [Path(configured).expanduser()]
    else:
        looked = [torch_hub_checkpoints_dir() / _official_file_name(model)]
    for path in looked:
        if path.is_file():
            return path
    url = _official_url(model)
    raise DetoxifyCheckpointNotFound(
        f"toxicity backend 'detoxify' needs a checkpoint and none was found; looked at:"
        f" {', '.join(str(p) for p in looked)}. Nothing is downloaded at run time. Either download"
        f" {url} and put it at {torch_hub_checkpoints_dir() / url.rsplit('/', 1)[-1]} (the file"
        " detoxify's own downloader writes; $TORCH_HOME defaults to ~/.cache/torch), or set"
        " toxicity.detoxify_checkpoint to the path of a .ckpt file. Its base transformer's"
        " config and tokenizer must be in the Hugging Face cache or in toxicity.detoxify_model_dir."
    )


# The official file names, as in detoxify 0.5.4's MODEL_URLS; read from the package when it is
# importable so that a newer release's names win.
_RELEASES = "https://github.com/unitaryai/detoxify/releases/download/"
_OFFICIAL_URLS = {
    "original": _RELEASES + "v0.1-alpha/toxic_original-c1212f89.ckpt",
    "unbiased": _RELEASES + "v0.3-alpha/toxic_debiased-c7548aa0.ckpt",
    "multilingual": _RELEASES + "v0.4-alpha/multilingual_debiased-0b549669.ckpt",
    "original-small": _RELEASES + "v0.1.2/original-albert-0e1d6498.ckpt",
    "unbiased-small": _RELEASES + "v0.1.2/unbiased-albert-c8519128.ckpt",
}


def _official_url(model: str) -> str:
    try:
        _hub_offline()
        return detoxify_download_url(model)
    except (ImportError, KeyError):
        return _OFFICIAL_URLS[model]


def _official_file_name(model: str) -> str:
    return _official_url(model).rsplit("/", 1)[-1]


def _hub_offline() -> None:
    """Make the Hugging Face libraries local-only unless the user said otherwise.

    The flag is read when huggingface_hub is imported, so it is set in the environment first and,
    if another stage already imported the library, on its constants too.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if os.environ["HF_HUB_OFFLINE"].upper() in {"1", "ON", "YES", "TRUE"}:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


_DETOXIFY_MODEL_CLASS = re.compile(r"[A-Za-z0-9]+ForSequenceClassification")
_DETOXIFY_TOKENIZER_CLASS = re.compile(r"[A-Za-z0-9]+Tokenizer(Fast)?")
# detoxify 0.5's load_checkpoint standardises the label names of its models this way.
_DETOXIFY_RENAMED = {
    "toxic": "toxicity",
    "identity_hate": "identity_attack",
    "severe_toxic": "severe_toxicity",
}


def read_detoxify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """A detoxify checkpoint's dict, read without running any code from the file.

    detoxify's own ``Detoxify(checkpoint=...)`` opens the file with ``torch.load(...,
    weights_only=False)``: a full unpickle, in which a crafted file runs whatever it names. The
    format needs nothing of the kind (a ``config`` dict of plain values from the training JSON
    and a ``state_dict`` of tensors, as detoxify's ``convert_weights.py`` writes it), so it is
    read here with ``weights_only=True``, which refuses any other Python object before calling
    it. The entries detoxify uses are then checked: ``config.arch.args`` must name a
    ``transformers`` ``...ForSequenceClassification`` class and a ``...Tokenizer`` class
    (detoxify looks both up by name with ``getattr``), ``config.dataset.args.classes`` the
    labels.
    """
    import torch

    from llmflow.tasks.train.checkpoints import unpickler_detail

    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DetoxifyCheckpointInvalid(
            f"detoxify checkpoint {checkpoint}: refused, it holds Python objects other than"
            " tensors and plain containers (nothing in it was run). A detoxify checkpoint is a"
            " dict of 'config' (plain values) and 'state_dict' (tensors); if the file comes from"
            f" a source you trust, re-save just those two entries. {unpickler_detail(exc)}"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise DetoxifyCheckpointInvalid(
            f"{checkpoint} is not a detoxify checkpoint: torch.load cannot read it ({exc})"
        ) from exc
    try:
        args = loaded["config"]["arch"]["args"]
        classes = loaded["config"]["dataset"]["args"]["classes"]
        state_dict = loaded["state_dict"]
        names = (args["model_type"], args["model_name"], args["tokenizer_name"])
    except (KeyError, TypeError) as exc:
        raise DetoxifyCheckpointInvalid(
            f"{checkpoint} is not a detoxify checkpoint: expected a torch.save'd dict with"
            " 'state_dict' and 'config' (arch.args: model_type, model_name, tokenizer_name,"
            f" num_classes; dataset.args.classes). Missing: {exc!r}"
        ) from exc
    if not isinstance(state_dict, dict) or not (
        isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    ):
        raise DetoxifyCheckpointInvalid(
            f"{checkpoint} is not a detoxify checkpoint: state_dict must be a dict of tensors"
            " and config.dataset.args.classes a list of label names"
        )
    model_type, model_name, tokenizer_name = names
    if not (
        isinstance(model_type, str)
        and isinstance(model_name, str)
        and _DETOXIFY_MODEL_CLASS.fullmatch(model_name)
        and isinstance(tokenizer_name, str)
        and _DETOXIFY_TOKENIZER_CLASS.fullmatch(tokenizer_name)
    ):
        raise DetoxifyCheckpointInvalid(
            f"detoxify checkpoint {checkpoint}: config.arch.args names model_name={model_name!r}"
            f" and tokenizer_name={tokenizer_name!r}; expected transformers classes such as"
            " 'BertForSequenceClassification' and 'BertTokenizer'"
        )
    return loaded


class DetoxifyScorer:
    """A detoxify checkpoint run through detoxify's own model code, its labels from the file.

    What runs: the file is read by :func:`read_detoxify_checkpoint` (weights only: nothing in it
    is executed), then the model is built as ``Detoxify(checkpoint=...)`` builds it, with
    detoxify's ``get_model_and_tokenizer`` (``transformers`` ``from_pretrained`` of the named
    classes with the checkpoint's state dict; configs and tokenizer files are read as data, no
    remote code) and detoxify's label renaming. ``Detoxify.__init__`` itself is bypassed
    because its first act is an unrestricted ``torch.load`` of the file.
    """

    def __init__(self, checkpoint: Path, model_dir: str | None = None, device: str = "cpu"):
        _hub_offline()
        folder = None if model_dir is None else Path(model_dir).expanduser()
        if folder is not None and not (folder / "config.json").is_file():
            raise DetoxifyModelNotFound(
                f"toxicity.detoxify_model_dir={model_dir!r} has no config.json: it must hold"
                " the base transformer's config.json and tokenizer files (save_pretrained)"
            )
        loaded = read_detoxify_checkpoint(checkpoint)
        if folder is not None:
            # detoxify builds the transformer from the hub id inside the checkpoint; pointing
            # that id at the local folder is the one way its model code loads fully offline.
            loaded["config"]["arch"]["args"]["model_type"] = str(folder.resolve())
        self._lock = threading.Lock()
        self._model = self._build(loaded, checkpoint, device)
        self.labels = tuple(self._model.class_names)
        _cap_tokenizer_length(self._model)

    @staticmethod
    def _build(loaded: dict[str, Any], named: Path, device: str) -> Any:
        """A ``Detoxify`` object holding the model, made from the loaded dict as detoxify 0.5's
        ``load_checkpoint`` makes it from the file."""
        from detoxify import Detoxify
        from detoxify.detoxify import get_model_and_tokenizer

        try:
            model, tokenizer = get_model_and_tokenizer(
                **loaded["config"]["arch"]["args"], state_dict=loaded["state_dict"]
            )
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise DetoxifyCheckpointInvalid(
                f"{named} is not a detoxify checkpoint: expected a torch.save'd dict with"
                " 'state_dict' and 'config' (arch.args: model_type, model_name, tokenizer_name,"
                f" num_classes; dataset.args.classes). Cause: {exc!r}"
            ) from exc
        except OSError as exc:
            raise DetoxifyModelNotFound(
                f"detoxify checkpoint {named} loaded, but its base transformer (config and"
                " tokenizer) could not be found offline. Put that model's config.json and"
                " tokenizer files in a folder and set toxicity.detoxify_model_dir to it, or"
                f" pre-fill the Hugging Face cache. Cause: {exc}"
            ) from exc
        detoxify = Detoxify.__new__(Detoxify)  # its __init__ would torch.load the file unsafely
        detoxify.model = model.to(device)
        detoxify.tokenizer = tokenizer
        classes = loaded["config"]["dataset"]["args"]["classes"]
        detoxify.class_names = [_DETOXIFY_RENAMED.get(c, c) for c in classes]
        detoxify.device = device
        return detoxify

    def score(self, texts: list[str]) -> dict[str, list[float]]:
        if not texts:
            return {label: [] for label in self.labels}
        with self._lock:  # one forward pass at a time: torch already uses every core
            result = self._model.predict(texts)
        # detoxify squeezes a batch of one into bare floats.
        return {
            label: [float(v) for v in (values if isinstance(values, list) else [values])]
            for label, values in result.items()
        }


def _cap_tokenizer_length(model: Any) -> None:
    """detoxify truncates at the tokenizer's model_max_length; make sure one is set.

    A tokenizer saved without it reports a huge number, and a chunk longer than the model's
    position table would crash the forward pass instead of being truncated.
    """
    tokenizer, config = model.tokenizer, model.model.config
    limit = getattr(config, "max_position_embeddings", 512)
    if getattr(config, "model_type", "") in {"roberta", "xlm-roberta", "camembert"}:
        limit -= 2  # their position ids start after the padding index
    if tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
