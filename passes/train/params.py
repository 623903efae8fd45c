"""The parameters of `train ... using lm(...)` and `train ... using distill(...)`.

Both share the optimizer recipe (AdamW, linear warm-up then cosine decay, gradient clipping and
accumulation) and the checkpointing knobs; `distill` adds the teacher and its loss weights.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from surgery.passapi import ORIGINAL, DataRef, DeclarationProblem, ModelRef, PassParams

LOSSES = ("cce", "full")


class TrainParams(PassParams):
    # Filled by the statement: `on DATA` and `for N steps`.
    data: DataRef = Field(description="the `data` declaration whose calibration split is trained on")
    steps: int = Field(ge=1, description="optimizer steps")
    # The optimizer recipe.
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    batch: int = Field(4, ge=1, description="sequences per micro-batch")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps with a linear warm-up")
    min_lr: float = Field(0.1, ge=0, le=1, description="final learning rate, as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    clip: float = Field(1.0, ge=0, description="gradient-norm clipping (0: off)")
    loss: Literal["cce", "full"] = Field(
        "cce", description="cce: Cut Cross-Entropy (no logits held); full: F.cross_entropy on logits")
    # Checkpoints: every K steps into `checkpoint` (default: beside the output); a rerun of the
    # same script resumes from the newest one.
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every K steps")
    checkpoint: str | None = Field(None, description="checkpoint directory")
    log_every: int = Field(10, ge=1, description="steps between loss lines in the report")
    evaluate: bool = Field(False, description="report held-out perplexity before and after")


class LmParams(TrainParams):
    """`lm(...)`: next-token cross-entropy on the data."""


class DistillParams(TrainParams):
    """`distill(teacher=original, temperature=2, ...)`: match a teacher's output distribution."""

    teacher: ModelRef = Field(ORIGINAL, description="`original` (the model before surgery) or a "
                                                    "declared model")
    temperature: float = Field(2.0, gt=0, description="softmax temperature of the KL term")
    kl: float = Field(1.0, ge=0, description="weight of KL(teacher || student) on the logits")
    hidden_mse: float = Field(0.0, ge=0, description="weight of the MSE on the last hidden states")
    ce: float = Field(0.0, ge=0, description="weight of the plain next-token cross-entropy")

    @model_validator(mode="after")
    def _some_loss(self) -> "DistillParams":
        if self.kl == 0 and self.hidden_mse == 0 and self.ce == 0:
            raise ValueError("kl, hidden_mse and ce are all 0: there is nothing to minimise")
        return self


def declaration_problems(params: TrainParams, program) -> list[DeclarationProblem]:
    """A data set smaller than one batch cannot train (found before anything loads)."""
    decl = program.data.get(params.data)
    if decl is not None and decl.samples < params.batch:
        return [DeclarationProblem(
            "E0341", f"data `{params.data}` has {decl.samples} sample(s), fewer than one batch "
                     f"of {params.batch}", "data",
            f"raise `samples=` in the declaration of `{params.data}` or lower `batch=`")]
    return []
