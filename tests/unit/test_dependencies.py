"""The installed transformers / TRL / PEFT accept every keyword merit passes them.

The keywords are read from merit's source with ``ast`` (never from a hand-written list), so a
keyword merit starts passing is checked automatically; they are compared with the installed
classes' ``dataclasses.fields`` or ``inspect.signature``. This is what the floors in
``pyproject.toml`` rest on (e.g. ``train_sampling_strategy`` is a TrainingArguments field from
transformers 5.2 on, and ``warmup_steps`` takes a ratio, a float, from transformers 5.0 on).

``**expr`` arguments are followed where they are built in the same module: dict literals,
``dict(...)`` calls, local functions returning either, and local variables assigned or
``.update(...)``-ed from those. Not covered: keys that come from user configuration at run time
(``training.extra``, i.e. ``cfg.extra``: validated by merit's config, not here); keywords whose
values are themselves passed on (only ``accelerator_config``'s dict keys are checked); positional
arguments; and ``from_pretrained`` keywords that transformers only reads out of ``**kwargs``, which
are checked against the text of its ``from_pretrained`` implementations (a named string there).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import merit

SRC = Path(merit.__file__).parent
TRAIN = ("train/sft.py", "train/checkpoints.py", "train/callbacks.py")


def _tree(rel: str) -> ast.Module:
    return ast.parse((SRC / rel).read_text(), filename=rel)


def _local_names(tree: ast.Module, module: str, name: str) -> set[str]:
    """The names ``module.name`` is imported under in ``tree`` (``from module import name as x``)."""
    out = {name}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == module:
            out |= {a.asname for a in node.names if a.name == name and a.asname}
    return out


def _callee(call: ast.Call) -> str | None:
    f = call.func
    if isinstance(f, ast.Call):  # factory()(...), e.g. trainer_class()(...)
        return _callee(f) + "()" if _callee(f) else None
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return None


class _Keys:
    """Keyword names of calls in one module, following ``**`` arguments built in that module."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.parents: dict[ast.AST, ast.AST] = {
            c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)
        }
        self.unresolved: set[str] = set()

    def _scope(self, node: ast.AST) -> ast.AST:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return self.tree

    def expr(self, e: ast.expr, seen: frozenset = frozenset()) -> set[str]:
        """The string keys a dict-valued expression can hold."""
        if isinstance(e, ast.IfExp):
            return self.expr(e.body, seen) | self.expr(e.orelse, seen)
        if isinstance(e, ast.Constant) and e.value is None:
            return set()
        if isinstance(e, ast.Dict):
            keys: set[str] = set()
            for k, v in zip(e.keys, e.values):
                if k is None:
                    keys |= self.expr(v, seen)
                elif isinstance(k, ast.Constant) and isinstance(k.value, str):
                    keys.add(k.value)
                else:
                    self.unresolved.add(ast.unparse(k))
            return keys
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name):
            if e.func.id == "dict":
                return self.keywords(e, seen) | set().union(*(self.expr(a, seen) for a in e.args))
            fn = self.functions.get(e.func.id)
            if fn is not None and fn.name not in seen:
                returns = [r.value for r in ast.walk(fn) if isinstance(r, ast.Return) and r.value]
                return set().union(*(self.expr(r, seen | {fn.name}) for r in returns))
        if isinstance(e, ast.Name) and ("$" + e.id) not in seen:
            return self._variable(e, seen | {"$" + e.id})
        self.unresolved.add(ast.unparse(e))
        return set()

    def _variable(self, name: ast.Name, seen: frozenset) -> set[str]:
        keys: set[str] = set()
        for node in ast.walk(self._scope(name)):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name.id for t in node.targets
            ):
                keys |= self.expr(node.value, seen)
            elif (
                isinstance(node, ast.Assign)
                and isinstance(node.targets[0], ast.Subscript)
                and isinstance(node.targets[0].value, ast.Name)
                and node.targets[0].value.id == name.id
                and isinstance(node.targets[0].slice, ast.Constant)
            ):
                keys.add(node.targets[0].slice.value)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == name.id
            ):
                keys |= set().union(*(self.expr(a, seen) for a in node.args))
                keys |= self.keywords(node, seen)
        return keys

    def keywords(self, call: ast.Call, seen: frozenset = frozenset()) -> set[str]:
        keys: set[str] = set()
        for kw in call.keywords:
            keys |= {kw.arg} if kw.arg else self.expr(kw.value, seen)
        return keys

    def calls(self, names: set[str]) -> list[ast.Call]:
        return [n for n in ast.walk(self.tree) if isinstance(n, ast.Call) and _callee(n) in names]


def _collect(modules, module: str, name: str, also: tuple[str, ...] = ()):
    """(keywords, calls found, unresolved ``**`` sources) of every call of ``module.name``."""
    keys: set[str] = set()
    found = 0
    unresolved: set[str] = set()
    for rel in modules:
        tree = _tree(rel)
        k = _Keys(tree)
        for call in k.calls(_local_names(tree, module, name) | set(also)):
            found += 1
            keys |= k.keywords(call)
        unresolved |= k.unresolved
    return keys, found, unresolved


def _init_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _params(fn) -> set[str] | None:
    """Parameter names of ``fn``; None when it takes ``**kwargs`` (then any keyword is accepted)."""
    ps = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values()):
        return None
    return set(ps)


def test_sft_config_accepts_every_keyword_merit_passes():
    from trl import SFTConfig

    keys, found, _ = _collect(TRAIN, "trl", "SFTConfig")
    assert found >= 1 and len(keys) >= 10, (found, keys)  # the collector still finds sft_config
    missing = keys - _init_fields(SFTConfig)
    assert not missing, f"trl.SFTConfig of this TRL/transformers lacks {sorted(missing)}"


def test_warmup_steps_takes_the_ratio_merit_passes():
    """merit passes ``warmup_steps=cfg.warmup_ratio``: a float below 1 is a ratio (transformers 5)."""
    from trl import SFTConfig

    keys, _, _ = _collect(TRAIN, "trl", "SFTConfig")
    if "warmup_steps" not in keys:
        pytest.skip("merit no longer passes warmup_steps")
    field = {f.name: f for f in dataclasses.fields(SFTConfig)}["warmup_steps"]
    assert "float" in str(field.type), (
        f"warmup_steps is {field.type}: no ratio before transformers 5"
    )


def test_accelerator_config_keys_are_accelerator_config_fields():
    from transformers.trainer_pt_utils import AcceleratorConfig

    keys: set[str] = set()
    for rel in TRAIN:
        k = _Keys(_tree(rel))
        for node in ast.walk(k.tree):
            if isinstance(node, ast.keyword) and node.arg == "accelerator_config":
                keys |= k.expr(node.value)
    assert keys, "no accelerator_config dict found in merit's SFTConfig settings"
    assert not keys - _init_fields(AcceleratorConfig), sorted(
        keys - _init_fields(AcceleratorConfig)
    )


def test_sft_trainer_accepts_every_keyword_merit_passes():
    from trl import SFTTrainer

    # merit instantiates its SFTTrainer subclass as ``trainer_class()(...)``.
    keys, found, _ = _collect(TRAIN, "trl", "SFTTrainer", also=("trainer_class()",))
    assert found >= 1 and keys, (found, keys)
    accepted = _params(SFTTrainer.__init__)
    assert accepted is None or not keys - accepted, sorted(keys - (accepted or set()))
    # trainer.train(resume_from_checkpoint=...) and model.save_pretrained(state_dict=...)
    train_keys, _, _ = _collect(TRAIN, "-", "train")
    accepted = _params(SFTTrainer.train)
    assert accepted is None or not train_keys - accepted, sorted(train_keys - (accepted or set()))


def test_save_pretrained_accepts_every_keyword_merit_passes():
    from transformers import PreTrainedModel

    keys, found, _ = _collect((*TRAIN, "train/lora.py"), "-", "save_pretrained")
    assert found >= 1
    accepted = _params(PreTrainedModel.save_pretrained)
    assert accepted is None or not keys - accepted, sorted(keys - (accepted or set()))


def test_peft_lora_config_accepts_every_keyword_merit_passes():
    from peft import LoraConfig

    keys, found, _ = _collect(("train/lora.py",), "peft", "LoraConfig")
    assert found >= 1 and keys, (found, keys)
    missing = keys - _init_fields(LoraConfig)
    assert not missing, f"peft.LoraConfig of this PEFT lacks {sorted(missing)}"


def test_from_pretrained_keywords_are_understood():
    """``from_pretrained`` reads most keywords out of ``**kwargs``: a keyword is accepted when it
    is a named parameter or a string literal in one of transformers' implementations."""
    from transformers import (
        AutoModelForCausalLM,
        AutoProcessor,
        AutoTokenizer,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        ProcessorMixin,
    )

    impls = [
        PreTrainedModel.from_pretrained,
        PreTrainedTokenizerBase.from_pretrained,
        PreTrainedTokenizerBase._from_pretrained,
        PretrainedConfig.get_config_dict,
        PretrainedConfig._get_config_dict,
        ProcessorMixin.from_pretrained,
        AutoModelForCausalLM.from_pretrained,
        AutoTokenizer.from_pretrained,
        AutoProcessor.from_pretrained,
    ]
    params = set().union(*(inspect.signature(f).parameters for f in impls))
    text = "\n".join(inspect.getsource(f) for f in impls)
    modules = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py"))
    keys, found, _ = _collect(modules, "-", "from_pretrained")
    assert found >= 3, found
    unknown = {k for k in keys if k not in params and f'"{k}"' not in text and f"'{k}'" not in text}
    assert not unknown, f"transformers' from_pretrained does not read {sorted(unknown)}"
