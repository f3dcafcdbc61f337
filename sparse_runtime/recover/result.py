"""What a recovery run returns: its curve (held-out perplexity against training tokens, with the training time
beside each point), its losses, and what the written checkpoint records of it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..data.perplexity import perplexity
from .windows import Windows


@dataclass
class RecoverResult:
    config: dict
    steps: int  # optimizer steps taken in all (a resumed run counts the earlier sessions')
    total_steps: int
    tokens: int  # training tokens seen
    seconds: float  # training time, evaluations excluded
    finished: bool
    evals: list = field(default_factory=list)  # {"tokens", "step", "seconds", "ppl"}: held-out perplexity
    losses: list = field(default_factory=list)  # {"step", "tokens", "loss", "lr"} per step ("layer" for block)
    windows: dict = field(default_factory=dict)
    out: str | None = None
    kept: dict | None = None  # keep_best: the evaluation whose tensors the model ends with {"step", "tokens", "ppl"}

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}

    def summary(self) -> dict:
        """What the written checkpoint records of its recovery."""
        first, last = (self.evals[0], self.evals[-1]) if self.evals else (None, None)
        return {"loss": self.config["loss"], "tokens": self.tokens, "steps": self.steps, "lr": self.config["lr"],
                "seqlen": self.config["seqlen"], "batch": self.config["batch"], "seconds": round(self.seconds, 1),
                "held_out_ppl": None if last is None else {"before": first["ppl"], "after": last["ppl"]},
                **({"kept_best": self.kept} if self.kept else {}),
                "windows": self.windows}


def held_out_perplexity(model, windows: Windows, device) -> float:
    """Perplexity of ``windows.held_out``, each window scored as it is (the model left in its training mode)."""
    was = model.training
    model.eval()
    try:
        return perplexity(model, windows.held_out.reshape(-1), seqlen=windows.held_out.shape[1], device=device,
                          progress=False).ppl
    finally:
        model.train(was)
