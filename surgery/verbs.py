"""The verbs of the language, as one table.

Every transforming or output statement has the shape ``VERB [operands] [PREP operands]...
[using METHOD(...)]``. A :class:`VerbSpec` row says, for one verb, what its operand and each
clause hold (a selector, a word, a path, a method ...), which ``Params`` field of the pass each one
fills, whether it is required, and how the usage line reads. The parser's keyword list and
grammar terminals, the checker's one generic statement check, the ``Script`` builder, the printer
and the usage text all read this table, so adding a verb is one row here plus a pass file
(docs/writing-passes.md walks through it).

A verb may have several forms told apart by a literal first word (``merge adapters`` vs
``merge A, B``). This module imports nothing heavy: the parser loads it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Slot(str, enum.Enum):
    """What one operand position holds."""

    SELECTOR = "selector"  # modules("..."), re("..."), type(X), set algebra -> Step.selector
    WORD = "word"  # one bare name: int8, softmax -> a str field
    WORDS = "words"  # comma-separated bare names: stablemax, int4_linear -> a list[str] field
    PATTERN = "pattern"  # 2:4 or 50% -> an NM / Percent field
    VALUE = "value"  # any literal value (a number, a string, a list ...) -> a field
    MODEL = "model"  # one declared model name -> a str field
    MODELS = "models"  # declared model names, comma-separated -> a list[str] field
    METHOD = "method"  # NAME or NAME(key=value, ...): names the pass, kwargs are its parameters
    OPTIONS = "options"  # NAME(key=value, ...) repeating the method named in another clause
    PATH = "path"  # a string -> a str field
    LITERAL = "literal"  # a fixed word that selects the form (`merge adapters`)
    COUNT = "count"  # a step count written `200 steps` -> an int field


@dataclass(frozen=True)
class Part:
    """One operand position: the statement's head or a clause."""

    slot: Slot
    field: str | None = None  # the Params field this part fills (None: selector / method)
    required: bool = True
    what: str = ""  # for messages: "a format such as int8 or int4"
    word: str | None = None  # the word of a LITERAL part


@dataclass(frozen=True)
class VerbSpec:
    verb: str
    head: Part | None  # the operands right after the verb
    clauses: dict[str, Part] = field(default_factory=dict)  # preposition -> part, in order
    using: Part | None = None  # what `using ...` holds; None: `using` is not allowed
    usage: str = ""
    summary: str = ""
    # A second operand right after the head with no comma between them (export onnx "x.onnx").
    tail: Part | None = None
    method: str | None = None  # a form whose method is fixed (merge adapters)
    # The selector when the statement has none: "everything" (lower, merge adapters), a module
    # state such as "adapted" (`train adapters`: the modules carrying it), or None for model
    # passes (merge, export, save), which act on the whole model.
    default_selector: str | None = None

    @property
    def head_then_path(self) -> bool:
        return self.tail is not None

    @property
    def fields(self) -> frozenset[str]:
        """Params fields the statement itself fills (the pass must declare the same)."""
        parts = [self.head, self.tail, *self.clauses.values()]
        return frozenset(p.field for p in parts if p is not None and p.field)

    def method_part(self) -> tuple[str, Part] | None:
        """Where the method is named: ('', head), (prep, clause) or ('using', part)."""
        if self.head is not None and self.head.slot is Slot.METHOD:
            return "", self.head
        for prep, part in self.clauses.items():
            if part.slot is Slot.METHOD:
                return prep, part
        if self.using is not None and self.using.slot is Slot.METHOD:
            return "using", self.using
        return None


_SELECTOR = Part(Slot.SELECTOR, what="a selector")
_METHOD_OPT = Part(Slot.METHOD, required=False, what="a method")
# `train ... on DATA for N steps using METHOD(...)`: both forms of `train` share these.
_TRAIN_CLAUSES = {"on": Part(Slot.WORD, "data", what="a data declaration name, e.g. calib"),
                  "for": Part(Slot.COUNT, "steps", what="a step count such as `200 steps`")}
_TRAIN_METHOD = Part(Slot.METHOD, what="a training method such as lm(lr=5e-4) or distill(...)")

VERBS: tuple[VerbSpec, ...] = (
    VerbSpec("quantize", _SELECTOR,
             {"to": Part(Slot.WORD, "format", what="a format such as int8 or int4")},
             using=_METHOD_OPT, usage="quantize SELECTOR to int8|int4 [using METHOD(...)]",
             summary="store weights as low-bit integers"),
    VerbSpec("prune", _SELECTOR,
             {"to": Part(Slot.PATTERN, "sparsity",
                         what="N:M (e.g. 2:4) or a percentage (e.g. 50%)")},
             using=_METHOD_OPT, usage="prune SELECTOR to N:M|P% [using METHOD(...)]",
             summary="zero weights, keeping an exact mask"),
    VerbSpec("adapt", _SELECTOR, {"with": Part(Slot.METHOD, what="an adapter such as lora(r=8)")},
             usage="adapt SELECTOR with METHOD(...)", summary="attach trainable adapters"),
    VerbSpec("swap", Part(Slot.WORD, "op", what="the op to replace, e.g. softmax"),
             {"in": _SELECTOR, "for": Part(Slot.METHOD, what="a replacement such as stablemax")},
             usage="swap softmax in SELECTOR for METHOD(...)",
             summary="replace the attention normaliser"),
    VerbSpec("merge", Part(Slot.LITERAL, word="adapters"),
             {"in": Part(Slot.SELECTOR, required=False, what="a selector")},
             usage="merge adapters [in SELECTOR]", summary="fold adapters into the base weights",
             method="adapters", default_selector="everything"),
    VerbSpec("merge", Part(Slot.MODELS, "models", what="declared model names"),
             {"into": Part(Slot.MODEL, "base", required=False, what="a declared model name")},
             using=Part(Slot.METHOD, what="a merge method"),
             usage="merge A, B [into BASE] using METHOD(...)", summary="merge whole models"),
    VerbSpec("compensate", _SELECTOR,
             using=Part(Slot.METHOD, what="a method such as eora(rank=32, data=calib) or svd"),
             usage="compensate SELECTOR using eora|svd(rank=R, ...)",
             summary="add a low-rank path cancelling the compression error"),
    VerbSpec("lower", Part(Slot.WORDS, "ops", what="op names, e.g. stablemax, int4_linear"),
             {"to": Part(Slot.METHOD, what="a backend such as triton"),
              "in": Part(Slot.SELECTOR, required=False, what="a selector")},
             using=Part(Slot.OPTIONS, required=False, what="options of the backend"),
             usage="lower OP, ... to BACKEND [in SELECTOR] [using BACKEND(...)]",
             summary="run ops on backend kernels", default_selector="everything"),
    VerbSpec("drop", Part(Slot.VALUE, "count", what="a number of blocks, e.g. 6"),
             {"of": Part(Slot.SELECTOR, what="a selector of decoder blocks")},
             using=_METHOD_OPT, usage="drop N of SELECTOR [using evopress(...)|cosine(...)]",
             summary="remove whole decoder blocks and renumber the rest"),
    VerbSpec("train", Part(Slot.LITERAL, word="adapters"), _TRAIN_CLAUSES, using=_TRAIN_METHOD,
             usage="train adapters on DATA for N steps using lm(...)|distill(...)",
             summary="train the adapters attached by `adapt`", default_selector="adapted"),
    VerbSpec("train", _SELECTOR, _TRAIN_CLAUSES, using=_TRAIN_METHOD,
             usage="train SELECTOR on DATA for N steps using lm(...)|distill(...)",
             summary="heal by training: fine-tune, distil, sparse-train"),
    VerbSpec("export", Part(Slot.METHOD, what="a format such as onnx or peft"),
             tail=Part(Slot.PATH, "path", what='a path string such as "out/model.onnx"'),
             usage='export FORMAT[(...)] "PATH"', summary="write another artifact format"),
    VerbSpec("save", Part(Slot.PATH, "path", what='a path string such as "out/model"'),
             usage='save "PATH"', summary="write the result (Hugging Face directory + manifest)"),
)


def verb_names() -> tuple[str, ...]:
    """Every verb, in table order, once."""
    return tuple(dict.fromkeys(v.verb for v in VERBS))


def forms(verb: str) -> list[VerbSpec]:
    return [v for v in VERBS if v.verb == verb]


def form_for(verb: str, first_word: str | None) -> VerbSpec:
    """The form of ``verb`` a statement uses: the one whose literal word is its first operand,
    else the general form."""
    candidates = forms(verb)
    for spec in candidates:
        if spec.head is not None and spec.head.slot is Slot.LITERAL and spec.head.word == first_word:
            return spec
    return next(s for s in candidates if s.head is None or s.head.slot is not Slot.LITERAL)


def prepositions() -> tuple[str, ...]:
    return tuple(dict.fromkeys(p for v in VERBS for p in v.clauses))


def usage(verb: str) -> str:
    return "usage: " + "  or  ".join(s.usage for s in forms(verb))


def add_verb(spec: VerbSpec) -> None:
    """Register a verb form (for plugins): the parser's grammar follows on its next parse."""
    global VERBS
    if spec not in VERBS:
        VERBS = VERBS + (spec,)  # a new tuple: the parser rebuilds its grammar from it
