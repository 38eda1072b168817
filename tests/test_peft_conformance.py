"""peft's own generic tuner tests, run against OSoRA.

The tests come from the source distribution of the installed peft version (fetched once with ``pip download`` into
``$OSORA_PEFT_SDIST_DIR``, default ``~/.cache/osora/peft-sdist``; never copied into this repository). Every test
method of ``test_custom_models.TestPeftCustomModel``, ``test_custom_models.TestMultipleActiveAdapters`` and
``test_decoder_models.TestDecoderModels`` that peft parametrises over its list of methods' configs is re-parametrised
here with OSoRA configs; peft's method-specific tests (LoRA's, VeRA's, ...) are not collected. peft's decoder tests
load tiny models from the Hub; here the same architectures are built from configs (offline).

A case that checks a peft behaviour which does not apply to OSoRA is an xfail naming the behaviour and the reason
(``XFAILS``). The default run keeps a representative subset of the cases (``DEFAULT_RUN``); ``-m slow`` runs the
rest.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers as tf

from osora import OSoRAConfig  # the import registers OSoRA with peft

CACHE = Path(os.environ.get("OSORA_PEFT_SDIST_DIR", "~/.cache/osora/peft-sdist")).expanduser()
PACKAGE = "peft_upstream_tests"


def _fetch_upstream_tests(version: str) -> tuple[Path | None, str]:
    """The ``tests`` folder of peft's sdist of ``version`` in the cache, downloaded and unpacked if missing."""
    tests = CACHE / f"peft-{version}" / "tests"
    if (tests / "testing_common.py").is_file():
        return tests, ""
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"peft-{version}.tar.gz"
    if not archive.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += [f"peft=={version}", "-d", str(CACHE), "-q"]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            return (
                None,
                f"could not fetch the peft=={version} sdist with pip download ({detail.strip()[-300:]})",
            )
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:  # unpack aside, then move: never half a folder
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
        (Path(scratch) / f"peft-{version}").rename(CACHE / f"peft-{version}")
    return tests, ""


def _import_upstream(tests: Path) -> dict[str, types.ModuleType]:
    """peft's test modules as the package ``peft_upstream_tests`` (their relative imports then resolve)."""
    if "diffusers" not in sys.modules:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            # testing_common imports diffusers only for isinstance checks in its Stable Diffusion tests, which are
            # not run here: a module whose class nothing is an instance of stands in for it.
            stand_in = types.ModuleType("diffusers")
            stand_in.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})  # type: ignore[attr-defined]
            sys.modules["diffusers"] = stand_in
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(tests)]
    sys.modules.setdefault(PACKAGE, package)
    return {
        name: importlib.import_module(f"{PACKAGE}.{name}")
        for name in ("test_custom_models", "test_decoder_models")
    }


_tests_dir, _why = _fetch_upstream_tests(peft.__version__)
if _tests_dir is None:
    pytest.skip(f"peft's generic tests not run: {_why}", allow_module_level=True)
try:
    _upstream = _import_upstream(_tests_dir)
except ImportError as _error:
    pytest.skip(f"peft's generic tests not run: importing them failed ({_error})", allow_module_level=True)
custom, decoder = _upstream["test_custom_models"], _upstream["test_decoder_models"]

# -- OSoRA's cases ----------------------------------------------------------------------------------------------

#: (test_name, model_id, config_cls, config_kwargs), as peft's TEST_CASES; model ids are peft's custom models.
CUSTOM_CASES = [
    ("Vanilla MLP 1 OSoRA", "MLP", OSoRAConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 OSoRA", "MLP", OSoRAConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 OSoRA", "MLP", OSoRAConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 OSoRA", "MLP", OSoRAConfig, {"target_modules": ["lin0", "lin1"], "r": 2}),
    ("Vanilla MLP 5 OSoRA", "MLP", OSoRAConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("MLP S only OSoRA", "MLP", OSoRAConfig, {"target_modules": ["lin0"], "trainable": "S"}),
    ("MLP scaled S, input O OSoRA", "MLP", OSoRAConfig,
     {"target_modules": ["lin0"], "s_parametrization": "scaled", "o_dim": "input"}),
    ("MLP compact OSoRA", "MLP", OSoRAConfig, {"target_modules": ["lin0", "lin1"], "save_factors": False}),
    ("Embedding + transformers Conv1D 1 OSoRA", "EmbConv1D", OSoRAConfig, {"target_modules": ["conv1d"]}),
]  # fmt: skip

#: (test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2), as peft's multi-adapter cases.
MULTI_CASES = [
    ("OSoRA Same", "osora", OSoRAConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "init_weights": False}),
    ("OSoRA Different", "osora", OSoRAConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
]  # fmt: skip

#: label -> (config_cls, config_kwargs), as peft's ALL_CONFIGS; target_modules=None: the architecture's defaults
DECODER_CONFIGS = {
    "identity": (OSoRAConfig, {"task_type": "CAUSAL_LM", "target_modules": None}),
    "scaled-random": (
        OSoRAConfig,
        {
            "task_type": "CAUSAL_LM",
            "target_modules": None,
            "r": 4,
            "s_parametrization": "scaled",
            "init_weights": False,
        },
    ),
}

_TINY = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=1000, max_position_embeddings=64)
#: the architectures of peft's PEFT_DECODER_MODELS_TO_TEST, built from configs instead of fetched from the Hub
TINY_DECODERS: dict[str, Callable[[], tf.PretrainedConfig]] = {
    "tiny-OPTForCausalLM": lambda: tf.OPTConfig(
        **_TINY, hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, pad_token_id=1
    ),
    "tiny-GPT2LMHeadModel": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=1000),
    "tiny-GPTJForCausalLM": lambda: tf.GPTJConfig(
        n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=1000
    ),
    "tiny-LlamaForCausalLM": lambda: tf.LlamaConfig(
        **_TINY, hidden_size=32, intermediate_size=48, num_key_value_heads=2
    ),
    "tiny-Qwen2ForCausalLM": lambda: tf.Qwen2Config(
        **_TINY, hidden_size=32, intermediate_size=48, num_key_value_heads=2
    ),
}


class TinyCausalLM:
    """Stands in for ``AutoModelForCausalLM`` in peft's decoder tests: same interface, a model built from a config."""

    @classmethod
    def from_pretrained(
        cls, model_id: str, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> tf.PreTrainedModel:
        if model_id not in TINY_DECODERS:  # a folder a test saved the model to
            return tf.AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **kwargs)
        torch.manual_seed(0)  # like a download: the same weights every time
        model = tf.AutoModelForCausalLM.from_config(TINY_DECODERS[model_id]())
        model.name_or_path = model.config._name_or_path = model_id  # as from_pretrained sets them
        if "device_map" in kwargs:
            model = model.to(kwargs["device_map"] if kwargs["device_map"] != "auto" else "cpu")
        return model.to(dtype or torch.float32).eval()  # from_pretrained returns a model in eval mode


#: the cases of the default test run (every generic test runs on each); the others are marked slow (``-m slow``)
DEFAULT_RUN = {
    "Vanilla MLP 4 OSoRA",
    "Embedding + transformers Conv1D 1 OSoRA",
    "OSoRA Different",
    "tiny-LlamaForCausalLM-scaled-random",
}

# -- what does not apply to OSoRA -------------------------------------------------------------------------------

#: (test method, substring of the case id) -> why the peft behaviour it checks does not apply to OSoRA
XFAILS: dict[tuple[str, str], str] = {}

# -- re-parametrisation -----------------------------------------------------------------------------------------


def _osora_class(
    upstream: type,
    name: str,
    argnames: str,
    generic: list[list[Any]],
    cases: list[Any],
    extra: dict[str, Any] | None = None,
) -> type:
    """A subclass of ``upstream`` whose generic tests run ``cases`` instead of peft's.

    A generic test is parametrised on ``argnames`` with peft's own lists of every method's cases (``generic``, e.g.
    ``TEST_CASES``). Every other test of ``upstream`` is method-specific and hidden (set to None).
    """
    names = set(_argnames(argnames))
    attrs: dict[str, Any] = dict(extra or {})
    for attr in dir(upstream):
        function = getattr(upstream, attr)
        if not attr.startswith("test_") or not callable(function):
            continue
        marks = list(getattr(function, "pytestmark", []))
        ours = [
            m
            for m in marks
            if m.name == "parametrize"
            and set(_argnames(m.args[0])) <= names
            and any(m.args[1] is values for values in generic)
        ]
        if {n for m in ours for n in _argnames(m.args[0])} != names:
            attrs[attr] = None
            continue
        test = types.FunctionType(
            function.__code__, function.__globals__, attr, function.__defaults__, function.__closure__
        )
        test.__dict__.update({k: v for k, v in function.__dict__.items() if k != "pytestmark"})
        test.__qualname__ = f"{name}.{attr}"
        params = [_xfail_if_listed(attr, case) for case in cases]
        test.pytestmark = [m for m in marks if m not in ours] + [pytest.mark.parametrize(argnames, params)]  # type: ignore[attr-defined]
        attrs[attr] = test
    return type(name, (upstream,), attrs)


def _xfail_if_listed(test: str, case: Any) -> Any:
    for (method, part), reason in XFAILS.items():
        if method == test and part in str(case.id):
            xfail = pytest.mark.xfail(reason=reason, strict=True)
            return pytest.param(*case.values, id=case.id, marks=(*case.marks, xfail))
    return case


def _argnames(names: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(n.strip() for n in names.split(",")) if isinstance(names, str) else tuple(names)


def _param(*values: Any, id: str) -> Any:
    return pytest.param(*values, id=id, marks=() if id in DEFAULT_RUN else (pytest.mark.slow,))


def _cases(cases: list[tuple[Any, ...]]) -> list[Any]:
    return [_param(*case, id=case[0]) for case in cases]


def _decoder_cases() -> list[Any]:
    return [
        _param(model_id, cls, kwargs, id=f"{model_id}-{label}")
        for model_id in TINY_DECODERS
        for label, (cls, kwargs) in DECODER_CONFIGS.items()
    ]


TestOSoRACustomModel = _osora_class(
    custom.TestPeftCustomModel,
    "TestOSoRACustomModel",
    "test_name, model_id, config_cls, config_kwargs",
    [custom.TEST_CASES],
    _cases(CUSTOM_CASES),
)
TestOSoRAMultipleActiveAdapters = _osora_class(
    custom.TestMultipleActiveAdapters,
    "TestOSoRAMultipleActiveAdapters",
    "test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2",
    [custom.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES],
    _cases(MULTI_CASES),
)
TestOSoRADecoderModels = _osora_class(
    decoder.TestDecoderModels,
    "TestOSoRADecoderModels",
    "model_id, config_cls, config_kwargs",
    [decoder.PEFT_DECODER_MODELS_TO_TEST, decoder.ALL_CONFIGS],
    _decoder_cases(),
    extra={"transformers_class": TinyCausalLM},
)
