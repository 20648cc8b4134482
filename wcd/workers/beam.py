"""vLLM's beam search (a request's use_beam_search), run in the worker as
vLLM's OpenAI server runs it (vllm 0.32, entrypoints/generate/beam_search/
online.py): outside the engine, in rounds of one-token requests, one per live
beam, each asking for twice the beam width's logprobs; the best candidates
become the next round's beams, and the best beams the prompt's completions.

A `Search` is one prompt's search as a state machine across engine steps, so
that its rounds are stepped with every other request: `round()` gives the
next round's engine requests, `take()` their outputs one by one, and once
`done`, `result()` the prompt's RequestOutput as vLLM's search yields it. The
worker's request bookkeeping (engine._Requests) adds the requests, routes
their outputs and aborts them with their request.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import BeamSearchParams, SamplingParams

from wcd.workers import protocol as p
from wcd.workers import vllm_seams


def params(sampling: dict[str, Any], options: p.BeamSearch, max_tokens: int
           ) -> BeamSearchParams:
    """vLLM's BeamSearchParams from a request's sampling fields (the model's
    defaults under them), as its to_beam_search_params makes them; vLLM's own
    BeamSearchParams checks the width (n)."""
    return vllm_seams.beam_search_params(
        beam_width=sampling.get("n", 1), max_tokens=max_tokens,
        ignore_eos=sampling.get("ignore_eos", False),
        temperature=sampling.get("temperature", 1.0), length_penalty=options.length_penalty,
        include_stop_str_in_output=sampling.get("include_stop_str_in_output", False),
        skip_special_tokens=sampling.get("skip_special_tokens", True))


class Search:
    """One prompt's beam search. `search_id` prefixes its rounds' engine
    request ids and is its result's request id; `logprobs`: whether the
    completions carry their logprobs (the request asked for them)."""

    def __init__(self, search_id: str, prompt, params: BeamSearchParams, tokenizer,
                 logprobs: bool):
        self.id = search_id
        self.prompt = prompt
        self.params = params
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.eos = tokenizer.eos_token_id
        # vLLM 0.26 decodes every token of a beam's text
        self.skip_special_tokens = getattr(params, "skip_special_tokens", False)
        self.beams = [vllm_seams.beam_sequence(orig_prompt=prompt,
                                               tokens=prompt["prompt_token_ids"],
                                               cum_logprob=0, logprobs=[])]
        self.completed: list = []
        self.rounds = 0
        self.answers: dict[str, RequestOutput | None] = {}  # this round's, by engine id
        self.failed = False  # a round's request ended in an engine error

    @property
    def done(self) -> bool:
        return self.failed or not self.beams or self.rounds == self.params.max_tokens

    @property
    def pending(self) -> list[str]:
        """The engine ids of this round's requests still running."""
        return [request_id for request_id, answer in self.answers.items() if answer is None]

    def round(self) -> list[tuple[str, Any, SamplingParams]]:
        """The next round's engine requests, one per live beam, in the beams'
        order: (engine id, prompt, params)."""
        self.rounds += 1
        params = vllm_seams.beam_round_params(self.params.beam_width, self.params.temperature)
        ids = [f"{self.id}-beam{self.rounds}-{i}" for i in range(len(self.beams))]
        self.answers = dict.fromkeys(ids)
        return [(request_id, beam.get_prompt(), params)
                for request_id, beam in zip(ids, self.beams)]

    def take(self, output: RequestOutput) -> bool:
        """One of this round's outputs; True once the round is complete and
        its beams chosen."""
        self.answers[output.request_id] = output
        if self.pending:
            return False
        self._choose([answer.outputs[0] for answer in self.answers.values()])
        return True

    def _choose(self, outputs: list[CompletionOutput]) -> None:
        """vLLM's step of the search, to the numpy call, so that ties break
        as there: every beam's candidates in its logprobs' order, an EOS one
        finishing its beam, the best `beam_width` of the rest going on."""
        if any(output.finish_reason == "error" for output in outputs):
            self.failed = True
            return
        if any(output.finish_reason == "abort" for output in outputs):
            for beam in self.beams:
                beam.finish_reason = "abort"
            self.completed += self.beams
            self.beams = []
            return
        candidates = []
        for beam, output in zip(self.beams, outputs):
            if output.logprobs is None:
                continue
            logprobs = output.logprobs[0]
            for token_id, logprob in logprobs.items():
                cum_logprob = beam.cum_logprob + logprob.logprob
                if token_id == self.eos and not self.params.ignore_eos:
                    self.completed.append(self._finished(beam, logprobs, cum_logprob))
                else:
                    candidates.append((cum_logprob, int(token_id), beam, logprobs))
        scores = np.fromiter((candidate[0] for candidate in candidates), dtype=np.float64,
                             count=len(candidates))
        width = self.params.beam_width
        if len(candidates) <= width:
            best = np.argsort(-scores)
        else:
            best = np.argpartition(-scores, width - 1)[:width]
            best = best[np.argsort(-scores[best])]
        self.beams = [vllm_seams.beam_sequence(orig_prompt=self.prompt,
                                               tokens=beam.tokens + [token_id],
                                               logprobs=beam.logprobs + [logprobs],
                                               cum_logprob=cum_logprob)
                      for cum_logprob, token_id, beam, logprobs in
                      (candidates[int(i)] for i in best)]

    def _finished(self, beam, logprobs, cum_logprob: float):
        """A beam ended by EOS, which its tokens keep only with
        include_stop_str_in_output."""
        kept = [self.eos] if self.params.include_stop_str_in_output else []
        return vllm_seams.beam_sequence(orig_prompt=self.prompt, tokens=beam.tokens + kept,
                                        logprobs=beam.logprobs + [logprobs],
                                        cum_logprob=cum_logprob, finish_reason="stop",
                                        stop_reason=self.eos)

    def result(self) -> RequestOutput:
        """The prompt's completions once done: the best beams, finished or
        not, by vLLM's score (or vLLM's one error output)."""
        if self.failed:
            outputs = [CompletionOutput(index=0, text="", token_ids=[], cumulative_logprob=None,
                                        logprobs=None, finish_reason="error")]
        else:
            score = vllm_seams.beam_score(self.eos, self.params.length_penalty)
            best = sorted(self.completed + self.beams, key=score,
                          reverse=True)[:self.params.beam_width]
            outputs = [self._completion(i, beam) for i, beam in enumerate(best)]
        return RequestOutput(request_id=self.id, prompt=self.prompt.get("prompt"),
                             prompt_token_ids=self.prompt["prompt_token_ids"],
                             prompt_logprobs=None, outputs=outputs, finished=True)

    def _completion(self, index: int, beam) -> CompletionOutput:
        generated = beam.tokens[len(self.prompt["prompt_token_ids"]):]
        # The text leaves a final EOS out, even one kept in the tokens.
        shown = generated[:-1] if beam.tokens[-1] == self.eos and not self.params.ignore_eos \
            else generated
        return CompletionOutput(
            index=index,
            text=self.tokenizer.decode(shown, skip_special_tokens=self.skip_special_tokens),
            token_ids=generated, cumulative_logprob=beam.cum_logprob,
            logprobs=[self._decoded(step) for step in beam.logprobs] if self.logprobs else None,
            finish_reason=beam.finish_reason or "length", stop_reason=beam.stop_reason)

    def _decoded(self, step: dict) -> dict:
        """A position's logprobs with their tokens' text, which the rounds
        did not detokenize: each token alone, as vLLM's server decodes them."""
        for token_id, logprob in step.items():
            if logprob.decoded_token is None:
                logprob.decoded_token = self.tokenizer.decode([token_id])
        return step
