"""slmlab models inside lm-evaluation-harness, as the registered model ``slmlab``.

Importing this module registers the model. From Python::

    import lm_eval, slmlab.eval.harness
    lm_eval.simple_evaluate(model="slmlab", model_args="pretrained=DIR", tasks=[...])

From the shell, this module is lm-eval's own command line with the model registered::

    python -m slmlab.eval.harness run --model slmlab --model_args pretrained=DIR \\
        --tasks stories_who --include_path ~/.cache/slmlab/tasks/...

The harness does its own request building, tokenization of (context, continuation) pairs,
rolling windows and metric aggregation; the model only scores token ids (through the same
batched forward as `Scorer.loglikelihood_tokens`) and generates text. So a test that compares
the harness's accuracies with `slmlab.eval.evaluate` checks slmlab's task reading, request
building and metrics against lm-evaluation-harness's own.
"""

from __future__ import annotations

from typing import Any

# lm-eval registers its own models (hf, vllm, ...) on first lookup, but only while its registry
# is empty: load them before registering ours, or `--model hf` would be unknown beside it.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .scorer import Scorer

__all__ = ["SlmlabLM"]


@register_model("slmlab")
class SlmlabLM(TemplateLM):
    """``--model slmlab --model_args pretrained=DIR[,batch_size=N,max_length=N,device=cpu,
    token_healing=True]``; for a zoo model, ``pretrained=$(slmlab zoo path stories-8m)``."""

    def __init__(
        self,
        pretrained: str | None = None,
        batch_size: int | str = 16,
        max_length: int | None = None,
        device: str = "cpu",
        token_healing: bool | str = False,
        scorer: Scorer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if scorer is None:
            if pretrained is None:
                raise ValueError(
                    "--model_args needs pretrained=DIR, a checkpoint directory (a zoo model's: "
                    "pretrained=$(slmlab zoo path NAME))"
                )
            from ..checkpoint import load, load_tokenizer

            path = pretrained
            scorer = Scorer(
                load(path, device=device),
                load_tokenizer(path),
                batch_size=int(batch_size) if str(batch_size) != "auto" else 16,
                max_length=int(max_length) if max_length else None,
                token_healing=str(token_healing).lower() == "true",
            )
        self.scorer = scorer

    @property
    def eot_token_id(self) -> int:
        return self.scorer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.scorer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.scorer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # lm-eval's cut, and where a superword token runs across it, the cut at that token
        # (`Scorer.encode_pair`): the same requests whichever way a task is run.
        return self.scorer.encode_pair(context, continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self.scorer.loglikelihood_tokens(
            [(context, continuation) for _, context, continuation in requests],
            progress=not disable_tqdm,
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # lm-eval's own windows over the text, scored as (context, continuation) token pairs.
        out = []
        for (text,) in [request.args for request in requests]:
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            out.append(sum(ll for ll, _ in self.scorer.loglikelihood_tokens(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.scorer.generate_until(
            [request.args for request in requests], progress=not disable_tqdm
        )


def main() -> None:
    """lm-eval's command line, with ``--model slmlab`` available."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
