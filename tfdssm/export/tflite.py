"""The query tower as a TFLite model with builtin ops only, for phones.

TFLite builtins have no string ops, so the string step happens in the app, with the
platform's Unicode library, exactly as :mod:`tfdssm.text` defines it; everything
after it (trigram hashing, embedding bags, MLP) runs in the model and matches the
served ``query`` signature.

Model inputs, one per query feature (batch of 1):

* text: int32 ``[1, max_length]``, code points of
  ``NFKC(text).casefold()``, truncated to ``max_length``, padded with 0;
* categorical: int32 ``[1]``, the value's line number in
  ``query_tower_vocab/<name>.txt`` plus 1, or 0 for an unknown value;
* multi-valued: int32 ``[1, max_tokens]``, token indices as above, padded with -1;
* numeric: float32 ``[1]``, the raw value.

Output: ``embedding`` float32 ``[1, dim]`` (``[1, heads, dim]`` for a multi-head
tower). ``query_tower.json`` records this for ``query_tower.tflite``; each
quantised variant ``query_tower.<mode>.tflite`` has its own
``query_tower.<mode>.json`` (same inputs, its own op list): see :func:`spec_path`.

Each feature says how it enters (or why it cannot) through
:meth:`tfdssm.features.Feature.tflite_input`. Towers reading other kinds of
features (a history of item ids, which needs string splitting; an example age,
served as a constant) are not converted: :func:`unsupported` says why,
``tfdssm train`` skips the file and notes that in ``export.json``; serve such
query towers from the ``towers`` SavedModel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tfdssm.errors import ConfigError, ExportError
from tfdssm.export import layout, loading
from tfdssm.features.basic import MAX_TOKENS, MULTILINGUAL  # noqa: F401 - re-exported
from tfdssm.features.protocol import TFLiteInput
from tfdssm.features.registry import feature_kind
from tfdssm.text.hashing import hashing_info

logger = logging.getLogger("tfdssm")

TFLITE_FILE = "query_tower.tflite"
SPEC_FILE = "query_tower.json"
VOCAB_DIR = "query_tower_vocab"
KERAS_DIR = "keras_towers"
from tfdssm.export import QUANTIZATIONS  # noqa: E402 - the option list, defined once

SUPPORTED_KINDS = ("text", "categorical", "multi_valued", "numeric")


def spec_path(model_path: str | os.PathLike) -> pathlib.Path:
    """The JSON spec describing one ``.tflite`` file: beside it, same stem.

    >>> spec_path("e/query_tower.tflite").name
    'query_tower.json'
    >>> spec_path("e/query_tower.float16.tflite").name
    'query_tower.float16.json'
    """
    return pathlib.Path(model_path).with_suffix(".json")


def unsupported(tower: tf.keras.layers.Layer) -> str | None:
    """Why the query tower cannot become a builtins-only TFLite model, or None.

    A feature refuses by returning a reason from
    :meth:`tfdssm.features.Feature.tflite_input`; the first reason is given.
    """
    reasons = [(f.kind, r) for f in tower.features
               if isinstance(r := f.tflite_input(), str)]
    if not reasons:
        return None
    kinds = sorted({kind for kind, _ in reasons})
    return (f"the query tower reads {kinds} features; the TFLite query tower takes "
            f"{list(SUPPORTED_KINDS)} features only ({reasons[0][1]}). Serve this "
            "query tower from the towers/ SavedModel (`query` signature) instead.")


def _inputs(tower: tf.keras.layers.Layer) -> list[TFLiteInput]:
    """Each feature's TFLite input, in order (the tower is :func:`unsupported`-free)."""
    out = []
    for feature in tower.features:
        hook = feature.tflite_input()
        if isinstance(hook, str):
            raise ExportError(f"cannot convert to TFLite: {unsupported(tower)}")
        out.append(hook)
    return out


def input_spec(tower: tf.keras.layers.Layer) -> list[dict[str, Any]]:
    """The TFLite model's inputs, in order (what ``query_tower.json`` lists)."""
    specs = []
    for feature, hook in zip(tower.features, _inputs(tower), strict=True):
        spec = dict(hook.spec)
        if hook.vocabulary is not None:
            spec["vocabulary"] = f"{VOCAB_DIR}/{feature.name}.txt"
        specs.append({"name": feature.name, "kind": feature.kind, **spec})
    return specs


def query_function(
    tower: tf.keras.layers.Layer,
) -> tf.types.experimental.ConcreteFunction:
    """Traces the tower's integer-input twin (the graph TFLite converts).

    Args:
        tower: A :class:`tfdssm.model.towers.Tower` (or ``SharedTower``).

    Returns:
        A concrete function ``(**inputs) -> {"embedding": [1, dim]}``.
    """
    hooks = _inputs(tower)
    specs = input_spec(tower)
    signature = [
        tf.TensorSpec(s["shape"], tf.int32 if s["dtype"] == "int32" else tf.float32,
                      name=s["name"])
        for s in specs
    ]

    def embed(*inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        fields = [
            hook.field(layer, x)
            for hook, layer, x in zip(hooks, tower.feature_layers, inputs, strict=True)
        ]
        return {"embedding": tower.combine(fields)}

    return tf.function(embed, input_signature=signature,
                       autograph=False).get_concrete_function()


def convert(
    tower: tf.keras.layers.Layer, quantization: str = "none"
) -> bytes:
    """Converts the query tower with ``TFLITE_BUILTINS`` only.

    Args:
        tower: The query tower.
        quantization: ``none`` (float32), ``dynamic`` (int8 weights, dynamic
            range) or ``float16`` (float16 weights).

    Returns:
        The flatbuffer bytes.

    Raises:
        ConfigError: an unknown quantization.
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"quantization must be one of {QUANTIZATIONS}, received {quantization!r}."
        )
    reason = unsupported(tower)
    if reason:
        raise ExportError(f"cannot convert to TFLite: {reason}")
    function = query_function(tower)
    # Track only the weights: the tower also owns the string-normalisation and
    # vocabulary hash tables, whose initialisers are not TFLite builtins (and the
    # integer-input graph never uses them).
    holder = tf.Module()
    holder.weights = list(tower.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    with _quiet_native_logs():
        return converter.convert()


def op_names(model: bytes) -> list[str]:
    """Distinct operator names in a TFLite model (``FlexX`` would be select ops).

    Read without the default XNNPACK delegate, so the list is the model's own.
    """
    interpreter = _interpreter(model, delegates=False)
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def _interpreter(model: bytes, delegates: bool = True) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: PLC0415

    resolver = (OpResolverType.AUTO if delegates
                else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    with _quiet_native_logs():
        interpreter = Interpreter(model_content=model,
                                  experimental_op_resolver_type=resolver)
        interpreter.allocate_tensors()
    return interpreter


# What the converter (absl: `W0000 00:00:... Ignored output_format.`) and the
# interpreter (`INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`) write
# to stderr whatever TF_CPP_MIN_LOG_LEVEL says; group 1 is the severity.
_NATIVE_LOG = re.compile(
    r"(?:([IWE])\d{4} \d\d:\d\d:[\d.]+ "
    r"|(W)ARNING: All log messages before absl::InitializeLog\(\)"
    r"|(I)NFO: Created TensorFlow Lite )")
_SEVERITY = {"I": 0, "W": 1, "E": 2}


def _hidden(line: str, level: int) -> bool:
    found = _NATIVE_LOG.match(line)
    if not found:
        return False
    severity = next(g for g in found.groups() if g)
    return _SEVERITY[severity] < level


@contextlib.contextmanager
def _quiet_native_logs() -> Iterator[None]:
    """Applies ``TF_CPP_MIN_LOG_LEVEL`` (1 hides info, 2 warnings, 3 errors) to
    the native log lines TFLite writes to stderr (file descriptor 2) without
    asking it; anything else written meanwhile is written back."""
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    if level <= 0:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _hidden(line, level))
            if kept:
                os.write(2, kept.encode())


class TFLiteQueryTower:
    """Runs ``query_tower.tflite`` in the ``ai_edge_litert`` interpreter.

    Args:
        model: Path to the ``.tflite`` file, or its bytes.
        spec: The model's JSON spec (default: read from :func:`spec_path`).
    """

    def __init__(self, model: str | os.PathLike | bytes,
                 spec: Mapping[str, Any] | None = None) -> None:
        if not isinstance(model, bytes):
            path = pathlib.Path(model)
            if not path.is_file():
                raise ExportError(f"{str(path)!r} not found; run `tfdssm tflite`.")
            if spec is None:
                spec = json.loads(spec_path(path).read_text())
            model = path.read_bytes()
        self.spec = dict(spec or {})
        self.interpreter = _interpreter(model)
        self.inputs = {d["name"]: d for d in self.interpreter.get_input_details()}
        (self.output,) = self.interpreter.get_output_details()

    def __call__(self, encoded: Mapping[str, np.ndarray]) -> np.ndarray:
        """Embeds one encoded query (see :func:`encode_query`); ``[1, dim]``."""
        for detail in self.inputs.values():
            name = _input_name(detail["name"], encoded)
            self.interpreter.set_tensor(
                detail["index"], np.asarray(encoded[name], dtype=detail["dtype"])
            )
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()


def _input_name(tensor_name: str, encoded: Mapping[str, Any]) -> str:
    # The converter names inputs "serving_default_<name>:0" or "<name>".
    for name in encoded:
        if tensor_name in (name, f"serving_default_{name}:0") or tensor_name.startswith(
            f"{name}:"
        ):
            return name
    raise ConfigError(f"no encoded value for TFLite input {tensor_name!r}.")


def encode_query(
    features: Mapping[str, Any],
    spec: Sequence[Mapping[str, Any]],
    vocabularies: Mapping[str, Sequence[str]],
) -> dict[str, np.ndarray]:
    """Reference encoder: raw query values -> TFLite inputs (what an app does).

    Args:
        features: Feature name -> one raw value (str for text/ids, number).
        spec: The ``inputs`` list of ``query_tower.json``.
        vocabularies: Feature name -> vocabulary (for categorical features).

    Returns:
        Feature name -> numpy array shaped as the model input.

    >>> spec = [{"name": "q", "kind": "text", "shape": [1, 4]}]
    >>> encode_query({"q": "Ab"}, spec, {})["q"].tolist()
    [[97, 98, 0, 0]]
    """
    return {item["name"]: feature_kind(item["kind"]).encode_tflite(
                features[item["name"]], item, vocabularies.get(item["name"], []))
            for item in spec}


def save_keras_towers(model: Any, export_dir: str | os.PathLike) -> pathlib.Path:
    """Saves tower configs and weights so the TFLite file can be rebuilt later."""
    target = pathlib.Path(export_dir) / KERAS_DIR
    target.mkdir(parents=True, exist_ok=True)
    config = {
        "query_tower": tf.keras.layers.serialize(model.query_tower),
        "candidate_tower": tf.keras.layers.serialize(model.candidate_tower),
    }
    layout.write_json_atomic(target / "config.json", config)
    checkpoint = tf.train.Checkpoint(query_tower=model.query_tower)
    checkpoint.write(str(target / "weights"))
    return target


def load_query_tower(export_dir: str | os.PathLike) -> tf.keras.layers.Layer:
    """Rebuilds the trained query tower from :func:`save_keras_towers` output."""
    from tfdssm.model import towers  # noqa: F401,PLC0415 - registers the Keras classes

    source = pathlib.Path(export_dir) / KERAS_DIR
    if not (source / "config.json").is_file():
        raise ExportError(
            f"{str(source)!r} is missing; this export predates TFLite support. "
            "Re-run `tfdssm train`."
        )
    config = json.loads((source / "config.json").read_text())
    tower = tf.keras.layers.deserialize(config["query_tower"])
    reason = unsupported(tower)
    if reason:
        raise ExportError(f"this export has no TFLite query tower: {reason}")
    status = tf.train.Checkpoint(query_tower=tower).read(str(source / "weights"))
    dummy = {f.name: tf.zeros([1], f.dtype) if f.dtype != tf.string
             else tf.constant([""]) for f in tower.features}
    tower(dummy)  # creates the variables; the checkpoint restores into them
    status.assert_existing_objects_matched()
    return tower


def write_tflite(
    tower: tf.keras.layers.Layer,
    export_dir: str | os.PathLike,
    quantization: str = "none",
) -> dict[str, Any]:
    """Writes ``query_tower[.<mode>].tflite``, its ``.json`` spec beside it
    (:func:`spec_path`) and the vocabularies.

    Returns:
        ``{"path", "bytes", "ops", "quantization"}``.
    """
    export_dir = pathlib.Path(export_dir)
    model = convert(tower, quantization)
    ops = op_names(model)
    suffix = "" if quantization == "none" else f".{quantization}"
    path = export_dir / TFLITE_FILE.replace(".tflite", f"{suffix}.tflite")
    specs = input_spec(tower)
    (export_dir / VOCAB_DIR).mkdir(exist_ok=True)
    for feature, hook in zip(tower.features, _inputs(tower), strict=True):
        if hook.vocabulary is not None:
            vocab = export_dir / VOCAB_DIR / f"{feature.name}.txt"
            vocab.write_text("".join(f"{v}\n" for v in hook.vocabulary))
    spec = {"inputs": specs, "output": {"name": "embedding", "dtype": "float32",
                                        "shape": [1, *_heads(tower), tower.output_dim]},
            "hashing": hashing_info(), "ops": ops}
    layout.write_json_atomic(spec_path(path), spec)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(model)
    os.replace(tmp, path)
    return {"path": str(path), "bytes": len(model), "ops": ops,
            "quantization": quantization}


def sample_queries(tower: tf.keras.layers.Layer,
                   count: int = 12) -> list[dict[str, Any]]:
    """Parity queries for a tower, from each feature's TFLite hook: the
    multilingual set for text features, vocabulary values plus an unknown one
    for ids, spread values for numbers."""
    hooks = _inputs(tower)
    return [{f.name: hook.sample(i, count) for f, hook in zip(tower.features, hooks,
                                                              strict=True)}
            for i in range(count)]


def parity(
    export_dir: str | os.PathLike,
    queries: Sequence[Mapping[str, Any]],
    model: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Compares ``query_tower.tflite`` with the served ``query`` signature.

    Args:
        export_dir: The export directory.
        queries: Raw query feature dicts (one value per feature).
        model: A ``.tflite`` path (default: ``query_tower.tflite``).

    Returns:
        ``{"max_abs_diff", "min_cosine", "queries"}``.
    """
    export_dir = pathlib.Path(export_dir)
    lite = TFLiteQueryTower(model or export_dir / TFLITE_FILE)
    # The towers version export.json names: the one being exported (add_tflite
    # runs after export.json, before the commit) or the committed one.
    signature = loading.load_towers(export_dir).signatures["query"]
    vocabularies = {
        s["name"]: (export_dir / s["vocabulary"]).read_text().splitlines()
        for s in lite.spec["inputs"] if "vocabulary" in s
    }
    worst, cosine = 0.0, 1.0
    for query in queries:
        got = lite(encode_query(query, lite.spec["inputs"], vocabularies))[0]
        kwargs = {s["name"]: tf.constant(
            [query[s["name"]]], tf.float32 if s["dtype"] == "float32" else tf.string)
            for s in lite.spec["inputs"]}
        want = signature(**kwargs)["embedding"].numpy()[0]
        worst = max(worst, float(np.abs(got - want).max()))
        denominator = float(np.linalg.norm(got) * np.linalg.norm(want)) or 1.0
        cosine = min(cosine, float(got.ravel() @ want.ravel()) / denominator)
    return {"max_abs_diff": worst, "min_cosine": cosine, "queries": len(queries)}


def _heads(tower: tf.keras.layers.Layer) -> list[int]:
    """``[heads]`` for a multi-head tower (output ``[1, heads, dim]``), else ``[]``."""
    heads = int(getattr(tower, "num_heads", 1))
    return [heads] if heads > 1 else []


def build(
    tower: tf.keras.layers.Layer, export_dir: str | os.PathLike,
    quantization: str = "none",
) -> dict[str, Any]:
    """Converts ``tower`` (:func:`write_tflite`) and checks its parity with the
    export's ``query`` signature (:func:`parity`).

    Returns:
        ``export.json``'s ``tflite`` entry: ``file``, ``bytes``, ``ops``,
        ``quantization``, ``parity``; plus ``path``, the file written.
    """
    written = write_tflite(tower, export_dir, quantization)
    check = parity(export_dir, sample_queries(tower), written["path"])
    return {"file": os.path.basename(written["path"]), "bytes": written["bytes"],
            "ops": written["ops"], "quantization": quantization, "parity": check,
            "path": written["path"]}


def rebuild(
    export_dir: str | os.PathLike, quantization: str = "none"
) -> dict[str, Any]:
    """(Re)builds the TFLite query tower of an export from its saved Keras
    tower (what ``tfdssm tflite`` does); ``export.json`` is left as it is.

    Returns:
        As :func:`build`.

    Raises:
        ExportError: ``export_dir`` is not a tfdssm export, or has no saved
            Keras query tower.
    """
    layout.read_export(export_dir)  # a clear error if this is not an export
    return build(load_query_tower(export_dir), export_dir, quantization)


def add_tflite(
    model: Any, export_dir: str | os.PathLike, info: dict[str, Any],
    verbose: bool = True, quantization: str = "none",
) -> dict[str, Any]:
    """Writes ``query_tower.tflite`` (+ tower weights to rebuild it), checks its
    parity with the exported ``query`` signature and records both in
    ``export.json``. Query towers TFLite cannot take (history features) get no
    file: ``export.json``'s ``tflite`` entry says why (``skipped``).

    :func:`tfdssm.export.savedmodel.export_model` calls this (unless
    ``tflite=False``); progress goes to the ``tfdssm`` logger (info) when
    ``verbose``.
    """
    save_keras_towers(model, export_dir)
    reason = unsupported(model.query_tower)
    if reason:
        info = {**info, "tflite": {"skipped": reason}}
        layout.write_json_atomic(os.path.join(export_dir, layout.EXPORT_JSON), info)
        if verbose:
            logger.info("no query_tower.tflite: %s", reason)
        return info
    entry = build(model.query_tower, export_dir, quantization)
    path = entry.pop("path")
    info = {**info, "tflite": entry}
    layout.write_json_atomic(os.path.join(export_dir, layout.EXPORT_JSON), info)
    if verbose:
        check = entry["parity"]
        logger.info("wrote %s (%s bytes, builtin ops only); max |TFLite - "
                    "SavedModel| = %.2e over %d queries", path,
                    f"{entry['bytes']:,}", check["max_abs_diff"], check["queries"])
    return info
